"""The package's upgrade marker (gpud.upgrade) as a real gpud sees it: a stop with the
marker keeps the engines and takes the marker, a start removes one left over, and
`keep_engines_on_upgrade = false` declines it. That the engines really survive a package
upgrade is shown under systemd with real engines: tests/test_packaging.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from gpudproc import Gpud, free_port, wait_for

from gpud import upgrade

BASE = ('models = {{}}\n[daemon]\nlisten = "127.0.0.1:{port}"\nstate_dir = "{state}"\n'
        'runtime_dir = "{run}"\n{extra}')


def _gpud(tmp_path: Path, extra: str = "") -> Gpud:
    port = free_port()
    cfg = tmp_path / "gpud.toml"
    cfg.write_text(BASE.format(port=port, state=tmp_path / "state", run=tmp_path / "run",
                               extra=extra))
    (tmp_path / "run").mkdir(exist_ok=True)
    return Gpud(cfg, port, log=tmp_path / "gpud.log")


def test_a_stop_with_the_marker_keeps_engines_and_takes_it(tmp_path: Path) -> None:
    g = _gpud(tmp_path).start()
    marker = tmp_path / "run" / upgrade.MARKER
    marker.write_text("gpud package upgrade 0.1.0 -> 0.1.1\n")
    assert g.stop() == 0
    log = g.log_text()
    assert "stopping for gpud package upgrade 0.1.0 -> 0.1.1: engines keep running" in log
    assert not marker.exists(), "the marker holds for one stop only"


def test_a_start_removes_a_left_over_marker(tmp_path: Path) -> None:
    marker = tmp_path / "run" / upgrade.MARKER
    g = _gpud(tmp_path)
    marker.write_text("gpud package upgrade 0.1.0 -> 0.1.1\n")
    g.start()
    try:
        wait_for(lambda: not marker.exists(), 5, "the left-over marker removed")
        assert "removed an unused upgrade marker" in g.log_text()
    finally:
        assert g.stop() == 0
    assert "stopping (engines too)" in g.log_text()


def test_keep_engines_on_upgrade_false_declines_the_marker(tmp_path: Path) -> None:
    g = _gpud(tmp_path, "keep_engines_on_upgrade = false\n").start()
    marker = tmp_path / "run" / upgrade.MARKER
    marker.write_text("gpud package upgrade 0.1.0 -> 0.1.1\n")
    assert g.stop() == 0
    log = g.log_text()
    assert "keep_engines_on_upgrade = false, so the engines stop too" in log
    assert "stopping (engines too)" in log and not marker.exists()


@pytest.mark.parametrize("env_dir", [True, False])
def test_marker_found_in_runtime_dir_or_the_units_runtime_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env_dir: bool
) -> None:
    runtime, unit_dir = tmp_path / "run", tmp_path / "unit-run"
    runtime.mkdir()
    unit_dir.mkdir()
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(unit_dir))
    (unit_dir if env_dir else runtime).joinpath(upgrade.MARKER).write_text("why\n")
    dirs = upgrade.marker_dirs(runtime)
    assert upgrade.take_marker(dirs) == "why"
    assert upgrade.take_marker(dirs) is None
