"""Classes over 400 lines and functions over 60 in gpud/ (STYLE.md's limits): prints them,
exit 1 if any. `python scripts/sizes.py [--classes N] [--functions N] [PATH...]`."""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def oversized(root: Path, classes: int, functions: int) -> list[tuple[str, str, int]]:
    out = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            limit = classes if isinstance(node, ast.ClassDef) else functions
            if n > limit:
                out.append((f"{path}:{node.lineno}", node.name, n))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("paths", nargs="*", default=["gpud"])
    ap.add_argument("--classes", type=int, default=400)
    ap.add_argument("--functions", type=int, default=60)
    args = ap.parse_args()
    found = [f for p in args.paths for f in oversized(Path(p), args.classes, args.functions)]
    for where, name, n in found:
        print(f"{where}: {name}: {n} lines")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
