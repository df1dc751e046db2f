"""Process supervision with real processes (plain Python children standing in for nothing
but a process tree: a leader with a child in its group, like vLLM's API server and
EngineCore). Fast: no model is loaded. The same code runs real vLLM in test_engines.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpud.engines.process import (
    EngineExited,
    EngineProcess,
    EngineSpawnError,
    EngineStartTimeout,
    NoFreePort,
    allocate_port,
    group_members,
    proc_start_time,
)
from gpud.engines.records import (
    EngineRecord,
    adopt,
    read_record,
    read_records,
    record_path,
    remove_record,
    write_record,
)

# A leader that starts a child in its own group (as vLLM starts EngineCore), says so, and
# waits. With IGNORE_TERM set, both ignore SIGTERM (a hung engine).
TREE = r"""
import os, signal, subprocess, sys, time
if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import os, signal, time\n"
    "if os.environ.get('IGNORE_TERM'): signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('child up', os.getpid(), flush=True)\n"
    "time.sleep(600)"])
print("leader up", os.getpid(), flush=True)
for i in range(3):
    print("line", i, flush=True)
time.sleep(600)
"""


def tree_argv() -> list[str]:
    return [sys.executable, "-c", TREE]


class Healthy:
    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.calls = 0

    async def health(self) -> bool:
        self.calls += 1
        return self.answer


async def wait_for_line(proc: EngineProcess, needle: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(needle in ln for ln in proc.log_tail()):
        assert time.monotonic() < deadline, f"no {needle!r} in {proc.log_tail()}"
        await asyncio.sleep(0.05)


@pytest.fixture
async def tree(tmp_path: Path) -> AsyncIterator[EngineProcess]:
    proc = EngineProcess.spawn("tree", tree_argv(), dict(os.environ), tmp_path / "logs")
    try:
        await wait_for_line(proc, "child up")
        yield proc
    finally:
        await proc.stop(grace=2)


async def test_spawn_logs_to_file_ring_and_gpud_log(
    tree: EngineProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gpud.engine")
    await wait_for_line(tree, "line 2")
    text = tree.log_path.read_text()
    assert text.startswith("--- gpud ") and "starting tree: " in text
    assert "leader up" in text and "child up" in text
    assert tree.log_tail(1) == ["line 2"] or "child up" in tree.log_tail(1)[0]
    assert not any(ln.startswith("--- gpud") for ln in tree.log_tail())  # only the engine's
    assert tree.pgid == tree.pid and os.getpgid(tree.pid) == tree.pid
    assert os.getsid(tree.pid) == tree.pid  # its own session: no tty signals from gpud's
    assert len(group_members(tree.pgid)) == 2


async def test_follower_reports_lines_with_the_model_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gpud.engine")
    proc = EngineProcess.spawn(
        "echoer", [sys.executable, "-c", "print('hello from engine')"], {}, tmp_path
    )
    assert await asyncio.wait_for(proc.wait(), 5) == 0
    recs = [r for r in caplog.records if "hello from engine" in r.getMessage()]
    assert recs and recs[0].getMessage() == "[echoer] hello from engine"
    assert getattr(recs[0], "model", None) == "echoer"


async def test_gpuds_own_polls_stay_out_of_the_engine_log_and_gpuds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gpud.engine")
    lines = [  # what vLLM's uvicorn writes for gpud's polls, then for a user's request
        'INFO:     127.0.0.1:42342 - "GET /is_sleeping HTTP/1.1" 200 OK',
        'INFO:     127.0.0.1:42342 - "GET /health HTTP/1.1" 200 OK',
        'INFO:     127.0.0.1:42342 - "GET /health HTTP/1.1" 503 Service Unavailable',
        'INFO:     127.0.0.1:50000 - "POST /v1/chat/completions HTTP/1.1" 200 OK',
    ]
    code = "\n".join(f"print({ln!r})" for ln in lines)
    proc = EngineProcess.spawn("poller", [sys.executable, "-c", code], {}, tmp_path)
    assert await asyncio.wait_for(proc.wait(), 5) == 0
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[poller]")]
    assert logged == [f"[poller] {ln}" for ln in lines[2:]]
    assert proc.log_tail(4) == lines[2:]  # `gpud logs` and the page: a failed poll stays
    header, text = proc.log_path.read_text().split("\n", 1)
    assert header.startswith("--- gpud ") and "starting poller" in header
    assert "/is_sleeping" not in text and "/health HTTP/1.1\" 200" not in text
    assert lines[3] in text


# A chatty engine: numbered lines as fast as it can, a long line without a newline now and
# then, gpud's polls in between; it says "done" at the end.
CHATTY = r"""
import sys
out = sys.stdout
for i in range(int(sys.argv[1])):
    out.write(f"line {i:06d} " + "x" * (i % 300) + "\n")
    if i % 50 == 0:
        out.write('INFO:     127.0.0.1:4242 - "GET /is_sleeping HTTP/1.1" 200 OK\n')
        out.write('INFO:     127.0.0.1:4242 - "GET /health HTTP/1.1" 200 OK\n')
    if i % 997 == 0:
        out.write("y" * 5000)
out.write("done\n")
out.flush()
"""


def _log_files(log_dir: Path, model: str) -> dict[str, int]:
    """Sizes of MODEL.log*; a file the writer rotates away between glob and stat is skipped."""
    out = {}
    for p in log_dir.glob(f"{model}.log*"):
        try:
            out[p.name] = p.stat().st_size
        except FileNotFoundError:
            continue
    return out


async def test_a_chatty_engine_never_exceeds_its_log_budget(tmp_path: Path) -> None:
    """engine_log_size x engine_log_files is a cap at every instant, the newest lines are
    kept in MODEL.log, the older in MODEL.log.1.., and gpud follows the file across rotations."""
    size, files = 16 * 1024, 3
    sizes_seen: list[int] = []
    proc = EngineProcess.spawn("chatty", [sys.executable, "-c", CHATTY, "20000"], {},
                               tmp_path, log_bytes=size, log_files=files)
    while proc.running:  # the budget holds while it writes, not only at the end
        sizes_seen.append(sum(_log_files(tmp_path, "chatty").values()))
        await asyncio.sleep(0.01)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    on_disk = _log_files(tmp_path, "chatty")
    assert set(on_disk) == {"chatty.log", "chatty.log.1", "chatty.log.2"}, on_disk
    assert all(n <= size for n in on_disk.values()), on_disk
    assert max([*sizes_seen, sum(on_disk.values())]) <= size * files
    newest = (tmp_path / "chatty.log").read_text()
    assert newest.rstrip().endswith("done")
    older = (tmp_path / "chatty.log.1").read_text()
    last_older = int(older.rsplit("line ", 1)[1][:6])
    first_newest = int(newest.split("line ", 1)[1][:6])
    assert first_newest > last_older  # .1 holds what came before
    assert "/is_sleeping" not in newest + older and "/health" not in newest + older
    assert proc.log_tail(1) == ["done"]  # followed into each new file
    assert any(ln.startswith("line 019") for ln in proc.log_tail())


def _read_or_empty(path: Path) -> str:
    """The file's text; empty in the instant a rotation has moved it and not yet made it."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


async def test_the_log_writer_outlives_gpud_and_keeps_the_cap(tmp_path: Path) -> None:
    """gpud stops watching (it exits; the next one adopts): the engine still logs, capped."""
    code = ("import sys, time\n"
            "for i in range(400):\n"
            "    print('tick', i, 'z' * 100, flush=True)\n"
            "    time.sleep(0.002)\n")
    proc = EngineProcess.spawn("alone", [sys.executable, "-c", code], {}, tmp_path,
                               log_bytes=4096, log_files=2)
    proc.close()  # gpud is gone
    deadline = time.monotonic() + 30
    while "tick 399" not in _read_or_empty(tmp_path / "alone.log"):
        assert time.monotonic() < deadline, _log_files(tmp_path, "alone")
        assert sum(_log_files(tmp_path, "alone").values()) <= 4096 * 2
        await asyncio.sleep(0.01)
    assert all(n <= 4096 for n in _log_files(tmp_path, "alone").values())
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pgid, signal.SIGKILL)


async def test_kill9_of_leader_is_seen_at_once_and_takes_the_group(
    tree: EngineProcess,
) -> None:
    members = group_members(tree.pgid)
    assert len(members) == 2
    seen = asyncio.get_running_loop().create_future()
    tree.add_exit_callback(lambda p: seen.set_result(time.monotonic()))
    t0 = time.monotonic()
    os.kill(tree.pid, signal.SIGKILL)
    detected = await asyncio.wait_for(seen, 2.0) - t0
    assert detected < 0.5, detected
    assert not tree.running and tree.returncode == -signal.SIGKILL
    assert await asyncio.wait_for(tree.wait(), 5) == -signal.SIGKILL
    assert group_members(tree.pgid) == []  # the orphaned child went with it
    assert not Path(f"/proc/{tree.pid}").exists()  # reaped, no zombie
    cause, detail = tree.crash_cause()
    assert cause == "other" and "SIGKILL" in detail


async def test_stop_sends_sigterm_to_the_group(tree: EngineProcess) -> None:
    members = group_members(tree.pgid)
    t0 = time.monotonic()
    rc = await tree.stop(grace=5)
    assert time.monotonic() - t0 < 2
    assert rc == -signal.SIGTERM
    assert all(not Path(f"/proc/{m}").exists() or group_members(tree.pgid) == [] for m in members)
    assert group_members(tree.pgid) == []
    assert await tree.stop() == rc  # twice is fine


async def test_stop_kills_after_grace_when_sigterm_is_ignored(tmp_path: Path) -> None:
    env = {**os.environ, "IGNORE_TERM": "1"}
    proc = EngineProcess.spawn("stubborn", tree_argv(), env, tmp_path)
    try:
        await wait_for_line(proc, "child up")
        t0 = time.monotonic()
        rc = await proc.stop(grace=0.5)
        took = time.monotonic() - t0
        assert rc == -signal.SIGKILL
        assert 0.5 <= took < 2.0
        assert group_members(proc.pgid) == []
    finally:
        proc.kill()


async def test_crash_before_healthy_is_classified(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "print('(APIServer pid=1) WARNING 11-23 14:40:11 [x.py:1] failed with error', flush=1)\n"
        "print('OSError: [Errno 98] Address already in use', file=sys.stderr)\n"
        "sys.exit(1)\n"
    )
    proc = EngineProcess.spawn("crasher", [sys.executable, "-c", script], {}, tmp_path)
    with pytest.raises(EngineExited) as e:
        await proc.wait_healthy(Healthy(False), timeout=30)
    assert e.value.cause == "port in use"
    assert e.value.returncode == 1
    assert "model 'crasher': engine exited with exit code 1: port in use" in str(e.value)


async def test_wait_healthy(tree: EngineProcess) -> None:
    assert await tree.wait_healthy(Healthy(True), timeout=5) < 1
    t0 = time.monotonic()
    with pytest.raises(EngineStartTimeout, match=r"did not answer /health within 0\.3s"):
        await tree.wait_healthy(Healthy(False), timeout=0.3, interval=0.1)
    assert time.monotonic() - t0 < 1


async def test_missing_command_is_a_spawn_error(tmp_path: Path) -> None:
    with pytest.raises(EngineSpawnError, match="cannot execute engine command"):
        EngineProcess.spawn("x", [str(tmp_path / "no-such-vllm"), "serve"], {}, tmp_path)
    assert "cannot execute" in (tmp_path / "x.log").read_text()


async def test_bad_model_names_cannot_escape_the_log_dir(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        EngineProcess.spawn("../etc", ["true"], {}, tmp_path)


# --- adoption -----------------------------------------------------------------------------


async def test_adopt_a_live_engine_and_see_it_die(tmp_path: Path) -> None:
    log_path = tmp_path / "adoptee.log"
    with open(log_path, "ab") as out:  # an engine from "the previous gpud"
        old = subprocess.Popen(
            tree_argv(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 10
        while "child up" not in log_path.read_text():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        start = proc_start_time(old.pid)
        assert start is not None
        runtime = tmp_path / "run"
        rec = EngineRecord("adoptee", old.pid, old.pid, start, 8123, "abc", str(log_path), 1.0)
        write_record(runtime, rec)
        got = read_record(runtime, "adoptee")
        assert got == rec and read_records(runtime) == [rec]

        proc = adopt(got, runtime)
        assert proc is not None
        assert (proc.pid, proc.adopted, proc.started_at) == (old.pid, True, 1.0)
        assert any("leader up" in ln for ln in proc.log_tail())  # backfilled from the file
        seen = asyncio.get_running_loop().create_future()
        proc.add_exit_callback(lambda p: seen.set_result(time.monotonic()))
        t0 = time.monotonic()
        os.kill(old.pid, signal.SIGKILL)
        assert await asyncio.wait_for(seen, 2.0) - t0 < 0.5
        assert await asyncio.wait_for(proc.wait(), 5) is None  # not our child: status unknown
        assert group_members(old.pid) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(old.pid, signal.SIGKILL)  # only if the test failed early
        old.wait()


async def test_adopt_refuses_a_reused_pid_and_removes_the_record(tmp_path: Path) -> None:
    me = os.getpid()
    start = proc_start_time(me)
    assert start is not None
    runtime = tmp_path / "run"
    rec = EngineRecord("stale", me, os.getpgrp(), start - 1, 1, "h", str(tmp_path / "l"), 0.0)
    write_record(runtime, rec)
    assert adopt(rec, runtime) is None
    assert not record_path(runtime, "stale").exists()
    # gpud's own process group is never adopted (stopping it would kill gpud)
    rec = EngineRecord("self", me, os.getpgrp(), start, 1, "h", str(tmp_path / "l"), 0.0)
    assert adopt(rec, runtime) is None


async def test_adopt_a_dead_pid(tmp_path: Path) -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    rec = EngineRecord("dead", p.pid, p.pid, 1, 1, "h", str(tmp_path / "l"), 0.0)
    write_record(tmp_path, rec)
    assert adopt(rec, tmp_path) is None
    assert read_record(tmp_path, "dead") is None


def test_unreadable_records_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "old.json").write_text('{"version": 0}')
    assert read_records(tmp_path) == []
    assert read_records(tmp_path / "missing") == []
    remove_record(tmp_path, "nothing-there")


# --- ports --------------------------------------------------------------------------------


def test_allocate_port_skips_taken_and_bound_ports() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        bound = s.getsockname()[1]
        lo = bound - 2 if bound > 1026 else bound
        taken = {lo} if lo != bound else set()
        port = allocate_port(lo, bound + 3, taken)
        assert port not in taken and port != bound
        with pytest.raises(NoFreePort, match=f"no free port in {bound}-{bound}"):
            allocate_port(bound, bound)
    with pytest.raises(ValueError):
        allocate_port(10, 5)
