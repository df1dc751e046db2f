"""The import contracts hold, and they bite: lint-imports on a temporary copy of gpud/ with a
deliberately wrong import (the web pages reaching into the loop's internals; the pure core
reading the clock) fails, naming the broken contract."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the copy, not the installed gpud
    return subprocess.run([str(LINT), "--config", str(tree / "pyproject.toml"), "--no-cache"],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "gpud", tmp_path / "gpud",
                    ignore=shutil.ignore_patterns("__pycache__", "static", "templates"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_contracts_hold_on_a_clean_copy(tree: Path) -> None:
    r = lint(tree)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "5 kept, 0 broken" in r.stdout


def test_web_importing_the_loop_internals_is_refused(tree: Path) -> None:
    append(tree / "gpud" / "web" / "page.py", "from gpud.instance import Instance  # noqa")
    r = lint(tree)
    assert r.returncode != 0
    assert "The web sees gpud through" in r.stdout and "BROKEN" in r.stdout
    assert "gpud.web.page -> gpud.instance" in r.stdout


def test_web_importing_the_daemon_is_refused(tree: Path) -> None:
    append(tree / "gpud" / "web" / "api.py", "import gpud.daemon  # noqa")
    r = lint(tree)
    assert r.returncode != 0
    assert "gpud.web.api -> gpud.daemon" in r.stdout


def test_the_pure_core_reading_the_clock_is_refused(tree: Path) -> None:
    append(tree / "gpud" / "desired.py", "import time  # noqa")
    r = lint(tree)
    assert r.returncode != 0
    assert "The pure core decides on data" in r.stdout and "BROKEN" in r.stdout
    assert "gpud.desired -> time" in r.stdout


def test_the_proxy_importing_the_web_is_refused(tree: Path) -> None:
    append(tree / "gpud" / "proxy" / "app.py", "import gpud.web.metrics  # noqa")
    r = lint(tree)
    assert r.returncode != 0
    assert "independent of each other BROKEN" in r.stdout.replace("\n", " ")
