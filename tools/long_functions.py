"""List the functions of src/longctx longer than a limit (default 60 lines), longest first.

    python tools/long_functions.py [--limit 60] [--all]

Kernels (attention/blocked.py, attention/fused.py, attention/bigbird.py, csrc/) are left out unless
``--all``: their length is the tile loop kept in one piece on purpose. Lines counted: from the ``def``
to the last line of the body, docstring included."""
from __future__ import annotations

import argparse
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "longctx"
KERNELS = {"attention/blocked.py", "attention/fused.py", "attention/bigbird.py"}


def long_functions(limit: int = 60, include_kernels: bool = False) -> list[tuple[int, str, str]]:
    """(lines, "path:line", qualified name) of every function longer than ``limit`` lines."""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if rel in KERNELS and not include_kernels:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        stack = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        n = child.end_lineno - child.lineno + 1
                        if n > limit:
                            found.append((n, f"{rel}:{child.lineno}", name))
                    stack.append((child, name + "."))
    return sorted(found, reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--all", action="store_true", help="include the kernels")
    args = ap.parse_args()
    rows = long_functions(args.limit, args.all)
    for n, where, name in rows:
        print(f"{n:>5}  {where:<40} {name}")
    print(f"{len(rows)} function(s) longer than {args.limit} lines")


if __name__ == "__main__":
    main()
