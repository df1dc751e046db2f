"""Fuzz of the live reload path (issue 21, Must show 2).

500 random mutations of a valid file go to a running gpud (no engines: every model is
unloaded). Between two mutations the valid file comes back with a new marker and must be
applied within 2 s. Every outcome is read from the daemon's event stream: each refusal must
carry the very error `gpud check`'s loader gives for those bytes, and no revision the daemon
applies may be one that the loader refuses. The seed is printed; GPUD_FUZZ_SEED replays it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import queue
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gpudproc import REPO, Gpud, free_port

from gpud.config import ConfigError, load_config

MUTATIONS = int(os.environ.get("GPUD_FUZZ_MUTATIONS", "500"))
DEADLINE = 2.0  # seconds for the watcher to apply (or refuse) one write

HEAD = """[daemon]
listen = "127.0.0.1:{port}"
state_dir = "{tmp}/state"
runtime_dir = "{tmp}/run"
"""
BODY = """tick = "2s"
kv_idle_after = "30s"
gpu_headroom = "1GiB"

[engines.vllm]
command = ["/nonexistent/vllm", "serve"]
startup_timeout = "15m"
health_interval = "1s"
max_restarts = 5
env = {A = "1"}

[models.chat]
source = "org/chat"
state = "unloaded"
max_model_len = 4096
kv_cache = "2GiB"
priority = 10
idle_sleep_after = "15m"
max_concurrency = 64
aliases = ["c"]
args = ["--enable-prefix-caching"]

[models.batch]
source = "org/batch"
state = "unloaded"
load_on_demand = true
request_timeout = "5m"

[profiles.night]
chat = "unloaded"
batch = {state = "unloaded"}

[[schedule]]
profile = "night"
when = "22:00-06:00"

[policies]
interval = "5s"
timeout = "200ms"
"""
HOSTILE = ['"99999999999d"', "1e300", "inf", "-inf", "nan", '"0s"', "0", "-1", "1e23",
           "100000000000000000000000", "9" * 400, '"sha256:..."', '"/nonexistent/x"', '""',
           "true", "[]", "{}", '{a = {b = {c = 1}}}', '"99999999TiB"', '"awake!"', '"1h30m"',
           '"500ms"', "3", '"org/x"', '"unloaded"', "{CUDA_VISIBLE_DEVICES = \"0\"}",
           "[" * 40 + "]" * 40, '"\\u0000"', "'''", '"' + "x" * 5000 + '"']
KEYS = ["tick", "source", "state", "gpu", "max_model_len", "kv_cache", "env", "priority",
        "replicas", "when", "profile", "interval", "timeout", "key_hash", "aliases", "args",
        "health_interval", "max_restarts", "startup_timeout", "port", "models", "oops"]


class Events:
    """The daemon's SSE stream, read by a thread into a queue."""

    def __init__(self, url: str) -> None:
        self.queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self.applied: list[str] = []  # every revision the daemon reported applying
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        conn.request("GET", "/api/v1/events")
        self._sock = conn.sock  # shut down to end the read at once (close() waits for it)
        self._resp = conn.getresponse()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for raw in self._resp:
                line = raw.decode()
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    if event["kind"] == "config":
                        if event.get("valid"):
                            self.applied.append(event["revision"])
                        self.queue.put(event)
        except (OSError, ValueError, AttributeError):  # AttributeError: closed under the read
            pass

    def wait(self, match: Callable[[dict[str, Any]], bool], what: str) -> float:
        """Seconds until an event matching `match` came; fails after DEADLINE."""
        t0 = time.monotonic()
        while (left := DEADLINE - (time.monotonic() - t0)) > 0:
            try:
                if match(self.queue.get(timeout=left)):
                    return time.monotonic() - t0
            except queue.Empty:
                break
        raise AssertionError(f"no event for {what} within {DEADLINE}s")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)


def mutate(rng: random.Random, body: str) -> str:
    lines = body.splitlines()
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(lines))
        op = rng.randrange(8)
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[i])
        elif op == 2 and "=" in lines[i]:
            lines[i] = lines[i].split("=", 1)[0] + "= " + rng.choice(HOSTILE)
        elif op == 3:
            lines.insert(i, f"{rng.choice(KEYS)} = {rng.choice(HOSTILE)}")
        elif op == 4:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 5:
            cut = rng.randrange(len(lines[i]) + 1)
            lines[i] = lines[i][:cut]
        elif op == 6:
            lines[i] += rng.choice(["]", "[", "{", '"', "=", " # x", "\\", "\x00", "é"])
        else:
            lines.insert(i, rng.choice(["[models.new]", "[[schedule]]", "[[auth.keys]]",
                                        "[engines.other]", "[daemon]", "[profiles.x]"]))
    return "\n".join(lines) + rng.choice(["\n", ""])


def revision_of(text: str, path: Path) -> str:
    """The revision gpud gives these bytes (load.py's digest), accepted or not."""
    digest = hashlib.sha256(path.name.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()[:12]


def verdict(path: Path) -> tuple[bool, str]:
    """What `gpud check` says of the file now: (valid, revision or the error text)."""
    try:
        return True, load_config(path).revision
    except ConfigError as exc:
        return False, str(exc)


@pytest.fixture
def fuzzed(tmp_path: Path) -> Iterator[tuple[Gpud, str]]:
    port = free_port()
    cfg = tmp_path / "etc" / "gpud.toml"
    cfg.parent.mkdir()
    head = HEAD.format(port=port, tmp=tmp_path)
    cfg.write_text(head + BODY)
    g = Gpud(cfg, port, log=tmp_path / "gpud.log").start()
    yield g, head
    assert g.stop() == 0


def write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(".gpud.toml.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def special(rng: random.Random, path: Path, body: str) -> None:
    """Files no editor writes but a box can hold: a FIFO, /dev/zero, a BOM, 2 MB."""
    kind = rng.randrange(4)
    if kind == 0:
        fifo = path.with_name(".fifo")
        os.mkfifo(fifo)
        os.replace(fifo, path)
    elif kind == 1:
        link = path.with_name(".zero")
        link.symlink_to("/dev/zero")
        os.replace(link, path)
    elif kind == 2:
        write_atomic(path, b"\xef\xbb\xbf" + body.encode())
    else:
        write_atomic(path, body + "# pad\n" * 400_000)


def test_500_mutations_never_apply_a_refused_file(fuzzed: tuple[Gpud, str],
                                                  tmp_path: Path) -> None:
    g, head = fuzzed
    path = g.config
    seed = int(os.environ.get("GPUD_FUZZ_SEED", random.randrange(2**32)))
    print(f"GPUD_FUZZ_SEED={seed}")
    rng = random.Random(seed)
    events = Events(g.url)
    t0 = time.monotonic()
    accepted, refused = {verdict(path)[1]}, set()
    samples: list[tuple[Path, bool]] = []
    waits: list[float] = []
    refusals: list[float] = []
    try:
        for i in range(MUTATIONS):
            base = f"{head}# step {i}\n{BODY}"
            write_atomic(path, base)
            rev = verdict(path)[1]
            accepted.add(rev)
            waits.append(events.wait(lambda e, r=rev: e.get("revision") == r and e["valid"],
                                     f"step {i}'s valid file"))
            text = head + mutate(rng, f"# step {i}\n{BODY}")
            how = rng.random()
            if how < 0.05:
                special(rng, path, text)
            elif how < 0.10:  # truncate, refused as empty, then the rest of the save
                with path.open("r+") as f:
                    f.truncate(0)
                events.wait(lambda e: not e["valid"] and "declares nothing" in e["error"],
                            f"step {i}'s truncated file")
                path.write_text(text)
            elif how < 0.55:
                path.write_text(text)  # in place
            else:
                write_atomic(path, text)
            ok, said = verdict(path)
            if path.is_file() and not path.is_symlink() and len(samples) < 15 and i % 7 == 0:
                copy = tmp_path / f"sample-{i}.toml"
                shutil.copyfile(path, copy)
                samples.append((copy, ok))
            if ok:
                accepted.add(said)
                if said != rev:
                    events.wait(lambda e, r=said: e["valid"] and e["revision"] == r,
                                f"step {i}'s valid mutation")
            else:
                if path.is_file():
                    refused.add(revision_of(path.read_bytes().decode(errors="replace")
                                            .removeprefix("\ufeff"), path))
                refusals.append(events.wait(lambda e, s=said: not e["valid"] and e["error"] == s,
                                            f"step {i}'s refusal: {said[:200]}"))
        final = f"{head}# after the fuzz\n{BODY}"
        write_atomic(path, final)
        rev = verdict(path)[1]
        accepted.add(rev)
        took = events.wait(lambda e: e["valid"] and e["revision"] == rev, "the final edit")
    finally:
        events.close()
    assert set(events.applied) <= accepted, set(events.applied) - accepted
    assert not set(events.applied) & refused
    assert g.status()["config"] == {**g.status()["config"], "valid": True, "revision": rev}
    assert "Traceback" not in g.log_text()
    t_cli = time.monotonic()
    for copy, ok in samples:  # the real command agrees with the loader the test used
        result = subprocess.run([sys.executable, "-m", "gpud.cli", "check", str(copy)],
                                capture_output=True, text=True, cwd=REPO, timeout=60)
        assert result.returncode == (0 if ok else 1), (copy.read_text()[:500], result.stderr)
    waits.sort()
    refusals.sort()
    print(f"{MUTATIONS} mutations in {t_cli - t0:.0f} s: {len(refusals)} refused (median "
          f"{refusals[len(refusals) // 2] * 1000:.0f} ms, max {refusals[-1] * 1000:.0f} ms), "
          f"{len(set(events.applied))} revisions applied; the valid file between them applied "
          f"in median {waits[len(waits) // 2] * 1000:.0f} ms, max {waits[-1] * 1000:.0f} ms; "
          f"the final edit in {took * 1000:.0f} ms; {len(samples)} `gpud check` runs agree")
