"""One-way layers (issue 26): every ``longctx`` import inside src/longctx goes from a higher layer to a lower
one (or stays within one layer), as README's Layout says data flows one way.

The scan is ``ast``-based: every ``import longctx.X`` / ``from longctx.X import ...`` / relative import, at
module level and inside functions (both execute; the one inside a function only later), is mapped from the
importing module's layer to the imported module's. ``from P import name`` counts as an import of the
module ``P.name`` where that module exists (``from longctx import io`` is ``longctx.io``).

Layers, lowest first (a module's layer is that of its top-level name under src/longctx):

0. errors, io, paths, progress, memory, plots, stats: leaf utilities (they import only each other).
1. positions, attention, cpu_cache, dropout, loss. The last three are part of attention, not leaf
   utilities: the caching CPU allocator, the counter-based dropout and the fused cross-entropy are compiled
   into one C++ extension with the fused band kernel (csrc/), and they load through ``attention/fused.py``
   (``fused.load``) and its policy in ``attention/dispatch.py``; attention's layer uses dropout, and their
   other users (models, train's trainer, bench) are above layer 1.
2. models, hf, and the package root ``longctx`` (``__init__.py``). hf/ is longctx attention inside Hugging
   Face models: it imports only attention and errors, and the root imports it with models to register
   both with transformers, so the three sit together; ``import longctx`` (eval's cli, bench's hf, for the
   registration) is then a downward import.
3. data, corpora (one layer: data's corpus loader names the shipped corpora, corpora fingerprint theirs
   with data's corpus module).
4. tasks.
5. train.
6. eval (its cli imports train's config and evaluation loop: downward).
7. experiments.
8. convert, bench, export, export_cli, config_cli, attention_cli, cli, lm_eval: entry points and integrations.
   Nothing in the package imports them except cli (by name, through importlib) and export_cli (export); otherwise they
   import from layers 0-5 (convert: models, positions; bench: attention, models, cpu_cache, the root;
   export: attention, models, tasks; config_cli: train's config; attention_cli: attention, models,
   positions, train's config; cli: errors).

Not seen by the scan: imports by a computed name (``importlib.import_module``). They are cli's
``COMMAND_MODULES`` (layer 8, the top), the task registries in ``train/trainer.py`` (``task_for``: train ->
tasks, downward) and ``train/finetune.py`` (``task_class``: train -> tasks, downward), and
convert/__init__'s lazy attributes (convert -> convert).

``ALLOWED`` lists the upward imports that remain, each with why it needs more than moving a helper; the
test fails on an upward import not listed and on a listed one that no longer occurs, so the list only
shrinks. It is empty: the last two entries went when ``longctx finetune`` (finetune.py and its command
module, finetune_cli.py) moved from tasks/ to train/, the layer of the training config and trainer it uses.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "longctx"

LAYER_NAMES = ("leaf utilities", "attention and positions", "models", "data", "tasks", "train", "eval",
               "experiments", "entry points")
LAYERS = {
    "errors": 0, "io": 0, "paths": 0, "progress": 0, "memory": 0, "plots": 0, "stats": 0,
    "positions": 1, "attention": 1, "cpu_cache": 1, "dropout": 1, "loss": 1,
    PACKAGE: 2, "models": 2, "hf": 2,
    "data": 3, "corpora": 3,
    "tasks": 4,
    "train": 5,
    "eval": 6,
    "experiments": 7,
    "convert": 8, "bench": 8, "export": 8, "export_cli": 8, "config_cli": 8, "attention_cli": 8, "cli": 8,
    "lm_eval": 8,
}

# (importing module, imported module): why it stays for now
ALLOWED: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    file: Path
    line: int
    importer: str  # dotted module name
    imported: str
    function: str | None  # the enclosing function, None at module level

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str, src: Path) -> bool:
    p = src.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def imports_of(path: Path, src: Path, package: str = PACKAGE) -> list[Import]:
    """Every import of ``package`` (or below) in the file at ``path``, module level and inside functions."""
    importer = module_name(path, src)
    is_init = path.name == "__init__.py"
    out: list[Import] = []

    def add(node, target: str, function):
        if target == package or target.startswith(package + "."):
            out.append(Import(path, node.lineno, importer, target, function))

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(child, alias.name, function)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: from the importer's package, one level up per extra dot
                    base = importer.split(".") if is_init else importer.split(".")[:-1]
                    base = base[:len(base) - (child.level - 1)]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                for alias in child.names:
                    sub = f"{module}.{alias.name}"
                    add(child, sub if alias.name != "*" and _is_module(sub, src) else module, function)
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else \
                "<lambda>" if isinstance(child, ast.Lambda) else None
            visit(child, function or inner)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), None)
    return sorted(set(out), key=lambda i: (i.line, i.imported))


def scan(src: Path = SRC, package: str = PACKAGE) -> list[Import]:
    return [imp for f in sorted((src / package).rglob("*.py")) for imp in imports_of(f, src, package)]


def layer_of(module: str, layers: dict[str, int], package: str = PACKAGE) -> int:
    parts = module.split(".")
    return layers[package if len(parts) == 1 else parts[1]]


def upward_imports(imports: list[Import], layers: dict[str, int], package: str = PACKAGE) -> list[Import]:
    return [i for i in imports if layer_of(i.importer, layers, package) < layer_of(i.imported, layers, package)]


def describe(i: Import, layers: dict[str, int] = LAYERS, package: str = PACKAGE) -> str:
    a, b = layer_of(i.importer, layers, package), layer_of(i.imported, layers, package)
    name = lambda k: f"layer {k}" + (f" ({LAYER_NAMES[k]})" if layers is LAYERS else "")
    where = f"inside {i.function}()" if i.function else "at module level"
    return f"{i.where()}: {i.importer} [{name(a)}] imports {i.imported} [{name(b)}] {where}"


def top_level_names(src: Path = SRC, package: str = PACKAGE) -> set[str]:
    """The top-level modules and packages with Python code under src/<package>."""
    return {module_name(f, src).split(".")[1] for f in (src / package).rglob("*.py") if f.parent != src / package
            or f.name != "__init__.py"}


# --------------------------------------------------------------------------------------------------------
def test_every_top_level_module_has_a_layer():
    names = top_level_names()
    assert names - set(LAYERS) == set(), f"place these in LAYERS (and the docstring): {sorted(names - set(LAYERS))}"
    gone = set(LAYERS) - names - {PACKAGE}
    assert gone == set(), f"LAYERS names what is gone: {sorted(gone)}"


def test_no_upward_imports_beyond_the_allow_list():
    bad = [describe(i) for i in upward_imports(scan(), LAYERS) if (i.importer, i.imported) not in ALLOWED]
    assert not bad, "imports from a lower layer to a higher one (move the code down, or import downward):\n" + \
        "\n".join(bad)


def test_every_allowed_upward_import_still_occurs():
    seen = {(i.importer, i.imported) for i in upward_imports(scan(), LAYERS)}
    stale = sorted(set(ALLOWED) - seen)
    assert not stale, f"these no longer occur: take them out of ALLOWED: {stale}"


def test_the_scan_sees_the_package():
    imports = scan()
    assert len(imports) > 300
    assert any(i.function for i in imports) and any(i.function is None for i in imports)
    # `from longctx import io` is an import of the module longctx.io
    assert any(i.importer == "longctx.train.config" and i.imported == "longctx.io" for i in imports)


# --- the checker itself, on planted trees ------------------------------------------------------------
PLANT_LAYERS = {"pkg": 1, "low": 0, "mid": 1, "high": 2}


def _plant(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / "pkg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


DOWNWARD = {
    "__init__.py": "",
    "low.py": "import os\n\nX = 1\n",
    "mid/__init__.py": "from pkg.low import X\nfrom pkg import low\n",
    "mid/core.py": "from ..low import X\nfrom . import helper\n\n\n"
                   "def f():\n    import pkg.low\n    return pkg.low.X\n",
    "mid/helper.py": "from .core import f\n",
    "high.py": "import pkg.mid.core\nfrom pkg.mid import helper\n\n\ndef g():\n    from pkg import low\n",
}


def test_the_checker_passes_a_tree_of_downward_imports(tmp_path):
    src = _plant(tmp_path, DOWNWARD)
    imports = scan(src, "pkg")
    assert [(i.importer, i.line, i.imported, i.function) for i in imports] == [
        ("pkg.high", 1, "pkg.mid.core", None), ("pkg.high", 2, "pkg.mid.helper", None),
        ("pkg.high", 6, "pkg.low", "g"),
        ("pkg.mid", 1, "pkg.low", None), ("pkg.mid", 2, "pkg.low", None),
        ("pkg.mid.core", 1, "pkg.low", None), ("pkg.mid.core", 2, "pkg.mid.helper", None),
        ("pkg.mid.core", 6, "pkg.low", "f"), ("pkg.mid.helper", 1, "pkg.mid.core", None)]
    assert upward_imports(imports, PLANT_LAYERS, "pkg") == []


def test_the_checker_catches_planted_upward_imports(tmp_path):
    src = _plant(tmp_path, {
        **DOWNWARD,
        # low (layer 0) reaches up: inside a function, absolutely, and at module level, relatively
        "low.py": "import os\n\nfrom .mid import helper\n\nX = 1\n\n\n"
                  "def h():\n    from pkg.high import g\n    return g\n",
    })
    up = upward_imports(scan(src, "pkg"), PLANT_LAYERS, "pkg")
    assert [(i.line, i.importer, i.imported, i.function) for i in up] == [
        (3, "pkg.low", "pkg.mid.helper", None), (9, "pkg.low", "pkg.high", "h")]
    msg = describe(up[1], PLANT_LAYERS, "pkg")
    assert str(src / "pkg" / "low.py") + ":9" in msg and "pkg.low [layer 0]" in msg and "pkg.high [layer 2]" in msg
    assert "inside h()" in msg and "at module level" in describe(up[0], PLANT_LAYERS, "pkg")
