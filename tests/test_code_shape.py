"""The house keeps its shape (issue 17): no class in gpud/ over 400 lines, no function over 60,
and the instance states are named in one place (gpud/states.py) that every list derives from."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from gpud.states import State

GPUD = Path(__file__).resolve().parents[1] / "gpud"
MAX_CLASS = 400
MAX_FUNCTION = 60


def _nodes() -> list[tuple[str, ast.AST]]:
    out = []
    for path in sorted(GPUD.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = path.relative_to(GPUD.parent)
        out += [(f"{rel}:{n.lineno} {n.name}", n) for n in ast.walk(tree)
                if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)]
    return out


def _length(node: ast.AST) -> int:
    assert isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
    assert node.end_lineno is not None
    return node.end_lineno - node.lineno + 1


def test_no_class_over_400_lines() -> None:
    big = {name: _length(n) for name, n in _nodes()
           if isinstance(n, ast.ClassDef) and _length(n) > MAX_CLASS}
    assert big == {}, f"classes over {MAX_CLASS} lines: {big}"


def test_no_function_over_60_lines() -> None:
    big = {name: _length(n) for name, n in _nodes()
           if not isinstance(n, ast.ClassDef) and _length(n) > MAX_FUNCTION}
    assert big == {}, f"functions over {MAX_FUNCTION} lines: {big}"


def test_no_other_list_of_instance_states() -> None:
    """A list, tuple, set or JS array naming three or more engine states is a copy that can
    drift (the page once missed `moving`); only gpud/states.py may spell them out."""
    names = {s.value for s in State}
    array = re.compile(r"""\[\s*((?:["'][a-z_]+["']\s*,\s*){2,}["'][a-z_]+["'])""")
    copies = []
    for path in sorted(GPUD.rglob("*")):
        rel = path.relative_to(GPUD.parent)
        if path.name == "states.py":
            continue
        if path.suffix == ".py":
            for n in ast.walk(ast.parse(path.read_text())):
                if isinstance(n, ast.List | ast.Tuple | ast.Set | ast.Dict):
                    items = n.keys if isinstance(n, ast.Dict) else n.elts
                    words = {e.value for e in items if isinstance(e, ast.Constant)}
                    if len(words & names) >= 3:
                        copies.append(f"{rel}:{n.lineno}")
        elif path.suffix in {".js", ".html"}:
            for m in array.finditer(path.read_text()):
                if len(set(re.findall(r"""["']([a-z_]+)["']""", m.group(1))) & names) >= 3:
                    copies.append(f"{rel}: {m.group(0)[:60]}")
    assert copies == [], f"state names listed outside gpud/states.py: {copies}"


def test_the_web_names_no_daemon_not_even_for_types() -> None:
    """The page, the API, /metrics and the guards take a Control (gpud/web/control.py)."""
    offenders = [p.name for p in sorted((GPUD / "web").glob("*.py"))
                 if "gpud.daemon" in p.read_text() or "reconciler" in p.read_text()]
    assert offenders == [], f"these reach past gpud.web.control.Control: {offenders}"
