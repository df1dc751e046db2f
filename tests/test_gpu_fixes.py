"""CPU tests for what the H100 run (bench/gpu/gpu_truth.py, issue 9) showed gpud must do.

- vLLM 0.26's GPU worker refuses to start unless free memory >= gpu_memory_utilization x
  total (default 0.92), even with --kv-cache-memory-bytes, which it then ignores for sizing:
  with a KV budget gpud passes a token utilization, so engines can share a GPU.
- The warm-up sleep/wake after a load leaves the state "awake" while the engine sleeps for a
  moment: requests must wait for it (and be released as soon as it ends), and a failing
  warm-up (the client raises EngineAPIError) must not fail the load.
- `gpud status` prints per-model memory from the status JSON's `memory_bytes`.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from gpud.config import load_config
from gpud.engines.spec import EngineSpec
from gpud.engines.vllm import KV_BUDGET_GPU_UTILIZATION, EngineAPIError, build_argv
from gpud.events import EventBus
from gpud.reconcile import Instance, Reconciler
from gpud.web.memory import model_bytes


def spec(**kw: Any) -> EngineSpec:
    base: dict[str, Any] = {"model": "chat", "command": ("vllm", "serve"), "source": "/m"}
    return EngineSpec(**{**base, **kw})


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_kv_budget_gets_a_token_gpu_memory_utilization() -> None:
    argv = build_argv(spec(kv_cache_bytes=4 << 30), 9000)
    assert flag(argv, "--kv-cache-memory-bytes") == str(4 << 30)
    assert flag(argv, "--gpu-memory-utilization") == repr(KV_BUDGET_GPU_UTILIZATION)
    assert KV_BUDGET_GPU_UTILIZATION <= 0.05


def test_explicit_utilization_wins_and_no_budget_means_no_flag() -> None:
    argv = build_argv(spec(kv_cache_bytes=4 << 30, gpu_memory_utilization=0.3), 9000)
    assert argv.count("--gpu-memory-utilization") == 1
    assert flag(argv, "--gpu-memory-utilization") == "0.3"
    assert "--gpu-memory-utilization" not in build_argv(spec(), 9000)


class SlowEngine:
    """A VllmClient stand-in: sleep and wake take a while, like the first sleep on a GPU."""

    def __init__(self, delay: float, fail: bool = False) -> None:
        self.delay, self.fail = delay, fail
        self.sleeping = False
        self.calls: list[str] = []

    async def sleep(self, level: int) -> None:
        self.calls.append(f"sleep{level}")
        await asyncio.sleep(self.delay)
        if self.fail:
            raise EngineAPIError("http://x", "POST /sleep", "HTTP 500")
        self.sleeping = True

    async def wake_up(self) -> None:
        self.calls.append("wake_up")
        await asyncio.sleep(self.delay)
        self.sleeping = False


def reconciler(tmp_path: Path) -> Reconciler:
    cfg = tmp_path / "gpud.toml"
    cfg.write_text('[models.chat]\nsource = "/m"\nstate = "awake"\n'
                   f'[daemon]\nstate_dir = "{tmp_path}"\nruntime_dir = "{tmp_path / "run"}"\n')
    loaded = load_config(cfg, check_files=False)
    return Reconciler(loaded, EventBus(), state_dir=tmp_path, runtime_dir=tmp_path / "run")


async def test_requests_wait_for_the_warm_sleep_and_are_released_at_once(tmp_path: Path) -> None:
    r = reconciler(tmp_path)
    r.pass_once = lambda: None  # type: ignore[method-assign]  # no engines to plan for here
    inst = r.instances["chat"] = Instance("chat", "chat", port=18555)
    inst.set_state("awake", "test")
    engine = SlowEngine(0.15)
    inst.client = engine  # type: ignore[assignment]
    warm = asyncio.create_task(r._warm_sleep(inst))
    await asyncio.sleep(0.01)  # the warm-up has put the engine to sleep
    t0 = time.monotonic()
    upstream = await asyncio.wait_for(r.ready_upstream("chat"), 5)
    waited = time.monotonic() - t0
    assert upstream == "http://127.0.0.1:18555"
    assert not engine.sleeping, "a request was routed to an engine in its warm-up sleep"
    assert waited < 0.8, f"released {waited:.2f}s late (the 1 s poll, not the wake)"
    await warm
    assert engine.calls == ["sleep1", "wake_up"] and inst.slept_once
    kinds = [e["kind"] for e in r.events.history(None)]
    assert "warm_sleep" in kinds


async def test_a_failing_warm_sleep_does_not_fail_the_load(tmp_path: Path) -> None:
    r = reconciler(tmp_path)
    inst = r.instances["chat"] = Instance("chat", "chat", port=18555)
    inst.set_state("awake", "test")
    inst.client = SlowEngine(0.0, fail=True)  # type: ignore[assignment]
    await r._warm_sleep(inst)  # raised EngineAPIError out of _load before
    assert inst.state == "awake" and inst.awake.is_set() and not inst.slept_once


def test_status_memory_bytes_per_model_from_nvml() -> None:
    memory = {"gpus": [{"index": 0, "models": {"tiny": 5 << 30, "large": 8 << 30}}],
              "host": {"engines": {"tiny": {"rss": 1}, "large": {"rss": 2}}}}
    assert model_bytes(memory) == {"tiny": 5 << 30, "large": 8 << 30}
    assert model_bytes({"gpus": [], "host": {"engines": {"tiny": {"rss": 7}}}}) == {"tiny": 7}
