"""The daemon follows its file: three ways of saving, an invalid save, SIGHUP and the API."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from gpudproc import Gpud, free_port, wait_for

BASE = '[daemon]\nlisten = "127.0.0.1:{port}"\nstate_dir = "{state}"\nruntime_dir = "{run}"\n'


@pytest.fixture
def daemon(tmp_path: Path) -> Gpud:
    port = free_port()
    cfg = tmp_path / "etc" / "gpud.toml"
    cfg.parent.mkdir()
    cfg.write_text(BASE.format(port=port, state=tmp_path / "state", run=tmp_path / "run"))
    g = Gpud(cfg, port, log=tmp_path / "gpud.log").start()
    yield g
    assert g.stop() == 0


def revision(g: Gpud) -> str:
    return str(g.status()["config"]["revision"])


def changed_from(g: Gpud, old: str) -> str:
    return wait_for(lambda: (r := revision(g)) != old and r, 1.0, "the new revision")


def test_three_ways_of_saving_each_seen_within_a_second(daemon: Gpud) -> None:
    path = daemon.config
    base = path.read_text()
    r0 = revision(daemon)

    with path.open("a") as f:  # in place
        f.write("# edit 1\n")
    r1 = changed_from(daemon, r0)

    tmp = path.with_name(".gpud.toml.swp")  # atomic rename, as editors do
    tmp.write_text(base + "# edit 2\n")
    os.rename(tmp, path)
    r2 = changed_from(daemon, r1)

    with path.open("r+") as f:  # truncate, then write
        f.truncate(0)
        f.flush()
        f.write(base + "# edit 3\n")
    r3 = changed_from(daemon, r2)
    assert len({r0, r1, r2, r3}) == 4
    assert daemon.status()["config"]["valid"] is True


def test_invalid_save_keeps_the_old_revision(daemon: Gpud) -> None:
    good = revision(daemon)
    daemon.config.write_text(daemon.config.read_text() + "[models.x]\nsource = 3\n")
    cfg = wait_for(lambda: (c := daemon.status()["config"])["valid"] is False and c, 1.0,
                   "valid=false")
    assert cfg["revision"] == good
    assert "gpud.toml:6:1: models.x.source:" in cfg["error"]
    # the last good file is kept in the state dir
    kept = list((daemon.config.parent.parent / "state" / "last-good").glob("*gpud.toml"))
    assert kept and "models.x" not in kept[0].read_text()


def test_identical_file_is_a_no_op_and_sighup_and_api_reload(daemon: Gpud) -> None:
    r0 = revision(daemon)
    daemon.config.write_text(daemon.config.read_text())
    result = daemon.request("POST", "/api/v1/reload", {})
    assert result == {"valid": True, "changed": False, "revision": r0, "error": None}
    with daemon.config.open("a") as f:
        f.write("# hup\n")
    assert daemon.proc is not None
    os.kill(daemon.proc.pid, signal.SIGHUP)
    changed_from(daemon, r0)


def test_reload_wait_exit_codes(daemon: Gpud) -> None:
    with daemon.config.open("a") as f:
        f.write("# reload --wait\n")
    ok = daemon.cli("reload", "--wait")
    assert ok.returncode == 0, ok.stderr
    daemon.config.write_text(daemon.config.read_text() + "oops = 1\n")
    bad = daemon.cli("reload", "--wait")
    assert bad.returncode == 1
    assert "oops" in bad.stderr and "reload refused" in bad.stderr


def test_embedded_default_when_no_file(tmp_path: Path) -> None:
    port = free_port()
    env = {"GPUD_LISTEN": f"127.0.0.1:{port}", "GPUD_STATE_DIR": str(tmp_path / "s"),
           "GPUD_RUNTIME_DIR": str(tmp_path / "r")}
    g = Gpud(tmp_path / "missing.toml", port, env=env)
    g.args = ()
    import subprocess
    import sys

    from gpudproc import REPO

    log = (tmp_path / "log").open("wb")
    g.proc = subprocess.Popen([sys.executable, "-m", "gpud.cli", "run"], cwd=REPO, env=g.env,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(g.healthy, 30, "gpud on the embedded default")
        cfg = g.status()["config"]
        if Path("/etc/gpud/gpud.toml").exists():
            pytest.skip("this machine has /etc/gpud/gpud.toml")
        assert cfg["embedded"] is True and g.status()["models"] == {}
        assert "embedded default" in (tmp_path / "log").read_text()
    finally:
        g.stop()
