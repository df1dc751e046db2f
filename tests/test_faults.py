"""Faults gpud must ride out (issue 21): an invalid file at start-up, a second gpud on the
same dirs, a fixed spec after a crash loop, a live `listen` change, a late `gpud.d/`.

Real `gpud run` processes on loopback ports, real files; no vLLM engine is needed here (the
engine-side faults are in test_e2e_faults.py).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from gpudproc import GPUD, REPO, Gpud, free_port, wait_for

BASE = ('[daemon]\nlisten = "127.0.0.1:{port}"\nstate_dir = "{root}/state"\n'
        'runtime_dir = "{root}/run"\ntick = "1s"\n')


def config(root: Path, port: int, extra: str = "") -> Path:
    path = root / "etc" / "gpud.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(BASE.format(port=port, root=root) + extra)
    return path


@pytest.fixture
def daemon(tmp_path: Path) -> object:
    port = free_port()
    g = Gpud(config(tmp_path, port), port, log=tmp_path / "gpud.log").start()
    yield g
    g.stop()


# --- item 3 (and issue 17's must-show 5): start-up on the last good config ----------------

def test_an_invalid_file_at_start_runs_on_the_last_good_one_and_says_why(tmp_path: Path) -> None:
    port = free_port()
    path = config(tmp_path, port, '[profiles.day]\n')
    g = Gpud(path, port, log=tmp_path / "gpud.log").start()
    good = g.status()["config"]["revision"]
    g.kill9()
    path.write_text(path.read_text() + "[models.x]\nsource = 3\n")
    g.start()
    cfg = g.status()["config"]
    assert cfg["revision"] == good and cfg["valid"] is False
    assert "running on the last good config" in cfg["fallback"]
    assert "gpud.toml:8:1: models.x.source:" in cfg["error"]
    out = g.cli("status").stdout
    assert f"config {good} LAST GOOD (the file is invalid)" in out and "models.x.source" in out
    with open(g.log) as f:
        journal = f.read()
    assert "is invalid; running on the last good config (revision" in journal
    # Fixed: the same revision again, now valid, and the note is gone.
    path.write_text(BASE.format(port=port, root=tmp_path) + '[profiles.day]\n')
    wait_for(lambda: g.status()["config"]["valid"], 5, "the fixed file to be seen")
    assert g.status()["config"]["fallback"] is None
    assert g.stop() == 0


def test_an_invalid_file_without_a_last_good_copy_exits_with_located_errors(
        tmp_path: Path) -> None:
    path = config(tmp_path, free_port(), "[models.x]\nsource = 3\n")
    r = subprocess.run([*GPUD, "run", "--config", str(path)], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    assert "gpud.toml:7:1: models.x.source:" in r.stderr and "no last good copy" in r.stderr


def test_a_last_good_copy_of_another_file_is_not_used(tmp_path: Path) -> None:
    port = free_port()
    path = config(tmp_path, port)
    g = Gpud(path, port, log=tmp_path / "gpud.log").start()
    g.stop()
    other = path.with_name("other.toml")
    other.write_text(path.read_text() + "[models.x]\nsource = 3\n")
    r = subprocess.run([*GPUD, "run", "--config", str(other)], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "models.x.source" in r.stderr


# --- item 6: one gpud per state and runtime dir --------------------------------------------

def test_a_second_gpud_on_the_same_dirs_is_refused_naming_the_first(daemon: Gpud,
                                                                    tmp_path: Path) -> None:
    assert daemon.proc is not None
    first = daemon.status()
    port2 = free_port()
    other = tmp_path / "etc" / "second.toml"
    other.write_text(daemon.config.read_text().replace(str(daemon.port), str(port2)))
    r = subprocess.run([*GPUD, "run", "--config", str(other)], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert f"another gpud (pid {daemon.proc.pid}) is already running on" in r.stderr
    # The first one did not notice.
    assert daemon.status()["daemon"] == first["daemon"]
    assert daemon.healthy()


def test_the_lock_goes_with_a_killed_gpud(tmp_path: Path) -> None:
    port = free_port()
    g = Gpud(config(tmp_path, port), port, log=tmp_path / "gpud.log").start()
    g.kill9()
    g.start()  # no stale lock to clean by hand
    assert g.stop() == 0

