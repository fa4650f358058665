"""README's Layout block matches the tree: every folder and module it names exists under src/longctx/,
and every package of src/longctx/ is named there."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "longctx"


def layout_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Layout\n+```\n(.*?)```", text, re.S | re.M)
    assert m, "README.md has no '## Layout' section with a code block"
    return m.group(1).splitlines()


def _strip_parens(s: str) -> str:
    while re.search(r"\([^()]*\)", s):
        s = re.sub(r"\([^()]*\)", "", s)
    return s


def named_entries() -> tuple[dict[str, list[str]], list[str], list[str]]:
    """(folder -> module names under it, top-level modules, repository-root folders). A module name is a
    list item (comma or + separated, parentheses dropped) that is one lowercase word, with or without .py."""
    folders: dict[str, list[str]] = {}
    top, root_dirs, current = [], [], None
    for line in layout_block():
        if line.strip() == "src/longctx/" or not line.strip():
            continue
        m = re.match(r"^  ([a-z_]+)/\s+(.*)$", line)
        if m:
            current, rest = m.group(1), m.group(2)
            folders[current] = []
        elif re.match(r"^  (\S+\.py)\b", line):  # top-level modules: "  io.py (…), progress.py (…)"
            current, rest = None, line
        elif line.startswith(" ") and current is not None:
            rest = line
        else:  # the repository-root line: "configs/  docs/ …"
            root_dirs += [w.rstrip("/") for w in line.split() if w.endswith("/")]
            current = None
            continue
        for item in re.split(r"[,+]", _strip_parens(rest)):
            word = item.strip()
            if re.fullmatch(r"[a-z_]+(\.py)?", word):
                (folders[current] if current is not None else top).append(word)
    return folders, top, root_dirs


def _exists(folder: Path, name: str) -> bool:
    if name.endswith(".py"):
        return (folder / name).is_file()
    return (folder / f"{name}.py").is_file() or (folder / name).is_dir()


def test_every_name_in_the_layout_exists():
    folders, top, root_dirs = named_entries()
    assert folders, "no folders parsed from the Layout block"
    missing = [f"{d}/" for d in folders if not (PKG / d).is_dir()]
    missing += [f"{d}/{n}" for d, names in folders.items() for n in names if (PKG / d).is_dir() and not _exists(PKG / d, n)]
    missing += [n for n in top if not _exists(PKG, n)]
    missing += [f"{d}/ (repository root)" for d in root_dirs if not (ROOT / d).is_dir()]
    assert not missing, f"README's Layout names what the tree lacks: {missing}"


def test_every_package_is_in_the_layout():
    folders, _, _ = named_entries()
    packages = sorted(p.parent.name for p in PKG.glob("*/__init__.py"))
    assert sorted(set(packages) - set(folders)) == [], "packages missing from README's Layout"
