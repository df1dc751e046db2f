"""The vLLM adapter: how to start a vLLM engine for a spec, and how to talk to it.

`build_argv`/`build_env` turn an `EngineSpec` into the exact argv and environment of the
engine process (always an argv list, never a shell string). `VllmClient` speaks the engine's
HTTP API: health, the sleep/wake dev endpoints (served under VLLM_SERVER_DEV_MODE=1), the
level-2 wake flow and `/metrics`. gpud trusts what the engine says (`/is_sleeping`,
`vllm:engine_sleep_state`) over its memory of what it asked for.
This module must never spawn or signal processes (that is `process.py`) and never import
vLLM itself: the engine runs in its own virtualenv.
"""

from __future__ import annotations

import asyncio
import contextlib
import json as jsonlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp

from gpud.engines.spec import EngineSpec

# Inherited variables that belong to gpud's own service manager contract. An engine that
# inherited NOTIFY_SOCKET could tell systemd "READY" or "STOPPING" for gpud; LISTEN_* would
# hand it gpud's sockets; WATCHDOG_* would make it ping gpud's watchdog.
_STRIP_EXACT = frozenset({"NOTIFY_SOCKET"})
_STRIP_PREFIXES = ("WATCHDOG_", "LISTEN_")

SLEEP_STATE_METRIC = "vllm:engine_sleep_state"
# label value of vllm:engine_sleep_state -> sleep level (0 = awake)
_SLEEP_LABELS = {"awake": 0, "weights_offloaded": 1, "discard_all": 2}

# --gpu-memory-utilization passed with a KV budget (kv_cache / kv_max) when the model sets
# none: vLLM then only checks free memory >= this x total at start-up (see build_argv).
KV_BUDGET_GPU_UTILIZATION = 0.01

# The warm-up after a wake nobody waits on (VllmClient.warm_up): prompt lengths in words
# (short chat, medium, long prefill, short again), output tokens per request, and the
# whole warm-up's time limit in seconds.
WARM_UP_PROMPT_WORDS = (8, 64, 256, 16)
WARM_UP_TOKENS = 8
WARM_UP_BUDGET_S = 2.0
KEEP_WARM_PULSE_S = 0.25  # one 1-token request this often, up to a boundary


# What vLLM batches when its args do not say (`--max-num-seqs`): 0.26's default for its API
# server is 1024 on an H100/H200-class GPU and 256 on others; gpud takes the larger, so its
# default admission never holds back a request the engine would have batched.
DEFAULT_MAX_NUM_SEQS = 1024


def max_num_seqs(args: Sequence[str]) -> int:
    """The most sequences the engine runs in one batch: `--max-num-seqs N` (or `=N`) from
    the model's args, the last one winning as in vLLM's parser; else vLLM's default."""
    found = DEFAULT_MAX_NUM_SEQS
    for i, arg in enumerate(args):
        value = None
        if arg == "--max-num-seqs" and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--max-num-seqs="):
            value = arg.partition("=")[2]
        if value is not None and value.isdigit() and int(value) > 0:
            found = int(value)
    return found


def build_argv(spec: EngineSpec, port: int, host: str = "127.0.0.1") -> list[str]:
    """The engine's argv: command, source, gpud's options, then the user's args."""
    argv = [*spec.command, spec.source]
    argv += ["--served-model-name", spec.name, "--host", host, "--port", str(port)]
    if spec.max_model_len is not None:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if spec.sleep_mode:
        argv.append("--enable-sleep-mode")
    if spec.kv_cache_bytes is not None:
        argv += ["--kv-cache-memory-bytes", str(spec.kv_cache_bytes)]
    if spec.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", repr(spec.gpu_memory_utilization)]
    elif spec.kv_cache_bytes is not None:
        # With a KV budget vLLM sizes nothing from --gpu-memory-utilization, but its GPU
        # worker (0.26) still refuses to start unless free memory >= utilization x total
        # (default 0.92): a second engine on a shared GPU, or one loaded beside running
        # ones, would fail with "Free memory on device ... is less than desired GPU memory
        # utilization". Measured on the H100 (bench/gpu): pass a token value so only the
        # budget counts.
        argv += ["--gpu-memory-utilization", repr(KV_BUDGET_GPU_UTILIZATION)]
    argv += spec.args
    return argv


def build_env(spec: EngineSpec, base_env: Mapping[str, str]) -> dict[str, str]:
    """The engine's environment: gpud's own, minus its service-manager contract, plus the
    spec's env, plus what gpud needs (which wins over both)."""
    env = {
        k: v
        for k, v in base_env.items()
        if k not in _STRIP_EXACT and not k.startswith(_STRIP_PREFIXES)
    }
    # Lines reach the log file as they are written, so a crash's cause is in the tail.
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(spec.env)
    env["VLLM_SERVER_DEV_MODE"] = "1"
    if spec.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(spec.gpu)
    return env


def parse_sleep_state(metrics_text: str) -> int | None:
    """The sleep level (0 awake, 1, 2) from `/metrics` text; None when the engine does not
    export `vllm:engine_sleep_state` (older vLLM)."""
    found: int | None = None
    for line in metrics_text.splitlines():
        if not line.startswith(SLEEP_STATE_METRIC + "{"):
            continue
        m = re.search(r'sleep_state="([^"]*)"\}\s+(\S+)', line)
        if m is None:
            continue
        level = _SLEEP_LABELS.get(m.group(1))
        if level is None:
            continue
        try:
            value = float(m.group(2))
        except ValueError:
            continue
        if value >= 1.0:
            if level == 0:
                return 0
            found = level
    return found


def request_sent_trace() -> aiohttp.TraceConfig:
    """A session trace that sets the asyncio.Event given as a request's `trace_request_ctx`
    once that request's headers were sent (a body-less control call is then on its way)."""

    async def headers_sent(session: aiohttp.ClientSession, ctx: Any, params: Any) -> None:
        event = ctx.trace_request_ctx
        if isinstance(event, asyncio.Event):
            event.set()

    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(headers_sent)
    return trace


class EngineAPIError(Exception):
    """An engine answered a control call with an error, or not at all."""

    def __init__(self, base_url: str, what: str, detail: str) -> None:
        super().__init__(f"engine at {base_url}: {what} failed: {detail}")
        self.base_url = base_url
        self.what = what
        self.detail = detail


class VllmClient:
    """The HTTP control API of one vLLM engine. The session is the caller's (one per
    daemon, shared by all engines); the client never closes it."""

    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession,
        *,
        health_timeout: float = 2.0,
        control_timeout: float = 300.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._health_timeout = aiohttp.ClientTimeout(total=health_timeout)
        # Sleep and wake move whole models between host and device memory: seconds on a GPU.
        self._control_timeout = aiohttp.ClientTimeout(total=control_timeout)

    @classmethod
    def for_port(
        cls, port: int, session: aiohttp.ClientSession, host: str = "127.0.0.1"
    ) -> VllmClient:
        return cls(f"http://{host}:{port}", session)

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        timeout: aiohttp.ClientTimeout | None = None,
        sent: asyncio.Event | None = None,
    ) -> str:
        url = self.base_url + path
        try:
            async with self._session.request(
                method, url, json=json, timeout=timeout or self._control_timeout,
                trace_request_ctx=sent,
            ) as resp:
                body = await resp.text()
                if resp.status >= 400:
                    raise EngineAPIError(
                        self.base_url, f"{method} {path}", f"HTTP {resp.status}: {body[:500]}"
                    )
                return body
        except (TimeoutError, aiohttp.ClientError) as e:
            raise EngineAPIError(
                self.base_url, f"{method} {path}", f"{type(e).__name__}: {e}"
            ) from e

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        body = await self._call(method, path, **kw)
        try:
            return jsonlib.loads(body) if body else None
        except ValueError as e:
            raise EngineAPIError(
                self.base_url, f"{method} {path}", f"not JSON: {body[:200]!r}"
            ) from e

    async def health(self) -> bool:
        """True when `GET /health` answers 200; False on any error, refusal or timeout."""
        try:
            async with self._session.get(
                self.base_url + "/health", timeout=self._health_timeout
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def sleep(self, level: int) -> None:
        """`POST /sleep?level=1|2`: 1 offloads weights to host memory and drops the KV
        cache; 2 drops both (waking then needs `reload_weights`)."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, not {level!r}")
        await self._call("POST", f"/sleep?level={level}")

    async def wake_up(self, sent: asyncio.Event | None = None) -> None:
        """`POST /wake_up`: weights and KV cache back on the device. `sent` is set once the
        request left (the session needs `request_sent_trace()`)."""
        await self._call("POST", "/wake_up", sent=sent)

    async def is_sleeping(self) -> bool:
        data = await self._json("GET", "/is_sleeping", timeout=self._health_timeout)
        if not isinstance(data, dict) or not isinstance(data.get("is_sleeping"), bool):
            raise EngineAPIError(self.base_url, "GET /is_sleeping", f"unexpected {data!r}")
        return bool(data["is_sleeping"])

    async def is_paused(self) -> bool | None:
        """`GET /is_paused`: whether the engine's scheduler is paused; None when the engine
        has no such endpoint (vLLM before 0.17). Asked once an engine is asleep: vLLM 0.17+
        pauses the scheduler for every sleep, so a request sent to a sleeping engine waits
        in its queue and runs once it wakes, instead of running on unmapped memory."""
        try:
            data = await self._json("GET", "/is_paused", timeout=self._health_timeout)
        except EngineAPIError as e:
            if e.detail.startswith(("HTTP 404", "HTTP 405")):
                return None
            raise
        paused = data.get("is_paused") if isinstance(data, dict) else None
        return paused if isinstance(paused, bool) else None

    async def reload_weights(self) -> None:
        """Reload the weights from the model source after a level-2 sleep."""
        await self._call("POST", "/collective_rpc", json={"method": "reload_weights"})

    async def warm_up(self, served_name: str, *, max_model_len: int | None = None,
                      budget: float = WARM_UP_BUDGET_S,
                      stop: Callable[[], bool] | None = None,
                      until: float | None = None, pulse: float = KEEP_WARM_PULSE_S) -> int:
        """A few small completions after a wake nobody waits on: the first requests after a
        wake are measurably slower on a GPU (H100, 1.8 GB model: 61 ms, then ~32 ms, against
        23 ms awake), so gpud pays for them instead of the first user. Sequential, prompts of
        several lengths (prefill shapes) and a few output tokens each (decode steps), within
        `budget` seconds in all. With `until` (the loop's clock), one 1-token request every
        `pulse` seconds follows, the last one done before `until`: an engine (and its GPU's
        clocks) kept busy up to a schedule boundary. Before each request, and every few ms
        during it, `stop()` is asked: a request waiting for this engine ends the warm-up at
        once (the in-flight warm-up request is dropped; vLLM aborts a request whose client
        went away); so does the end of the budget. Returns how many completed. Raises
        EngineAPIError if one fails."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        # ~1-2 tokens a word; keep prompt + output well inside the model's context
        cap = max(1, ((max_model_len or 2048) - WARM_UP_TOKENS) // 3)
        done = 0
        for words in WARM_UP_PROMPT_WORDS:
            body = {"model": served_name, "prompt": " ".join(["warm"] * min(words, cap)),
                    "max_tokens": WARM_UP_TOKENS, "temperature": 0, "ignore_eos": True}
            if not await self._warm_one(body, deadline, stop):
                break
            done += 1
        if until is None or (stop is not None and stop()):
            return done
        body = {"model": served_name, "prompt": "warm", "max_tokens": 1, "temperature": 0}
        while loop.time() + pulse < until:
            await asyncio.sleep(pulse)
            if not await self._warm_one(body, until - pulse / 2, stop):
                break
            done += 1
        return done

    async def _warm_one(self, body: dict[str, Any], deadline: float,
                        stop: Callable[[], bool] | None) -> bool:
        """One warm-up request; False when it was not sent or was given up (stop, deadline)."""
        loop = asyncio.get_running_loop()
        if loop.time() >= deadline or (stop is not None and stop()):
            return False
        call = asyncio.ensure_future(self._call("POST", "/v1/completions", json=body))
        while not call.done():
            await asyncio.wait({call}, timeout=0.005)
            if not call.done() and ((stop is not None and stop()) or loop.time() >= deadline):
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError, EngineAPIError):
                    await call
                return False
        call.result()
        return True

    async def reset_prefix_cache(self) -> None:
        await self._call("POST", "/reset_prefix_cache")

    async def metrics_text(self) -> str:
        return await self._call("GET", "/metrics", timeout=self._health_timeout)

    async def sleep_state_from_metrics(self) -> int | None:
        """The engine's own sleep level (0 awake, 1, 2), or None if it does not say."""
        return parse_sleep_state(await self.metrics_text())

    async def wake(self, level: int | None = None,
                   sent: asyncio.Event | None = None) -> int | None:
        """Wake fully from any sleep. After a level-2 sleep the weights were discarded:
        wake_up, reload_weights, then reset_prefix_cache (cached prefixes were computed
        with weights that are gone). With `level=None` the engine's metrics say which
        sleep it is in. Returns the level it woke from (None: unknown, treated as 1)."""
        if level is None:
            level = await self.sleep_state_from_metrics()
        await self.wake_up(sent=sent)
        if level == 2:
            await self.reload_weights()
            await self.reset_prefix_cache()
        return level
