"""What one engine process is: the effective spec of a model, as data, and its hash.

The reconciler compares `spec_hash()` of the desired spec with the one recorded for a
running engine: equal means "leave it alone" (also across a gpud restart, by adoption),
different means "restart it". So the hash covers exactly what changes the process and
nothing else, and is stable across Python runs and versions (sha256 of canonical JSON).
`check_args` refuses user args that would take an engine out of gpud's control; the config
validator calls it so the error shows at `gpud check` time, not at spawn time.
This module is pure data: it must never do I/O, spawn, or import asyncio/aiohttp.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

# Options gpud sets itself and the reason a user may not: each would break routing,
# health checks, adoption or sleep/wake.
FORBIDDEN_ARGS: dict[str, str] = {
    "--port": "gpud allocates each engine's port from its configured range",
    "--host": "engines listen on loopback only; the proxy is the public endpoint",
    "--uds": "gpud reaches engines over TCP on loopback",
    "--served-model-name": "the model's name is its key in the [models] table",
    "--model": "set the model's `source` instead",
    "--api-key": "the engine must answer gpud's health and sleep calls; use [[auth.keys]]",
    "--root-path": "gpud's proxy and health checks expect the engine's API at /",
    "--ssl-keyfile": "gpud talks plain HTTP to engines on loopback; TLS belongs in front",
    "--ssl-certfile": "gpud talks plain HTTP to engines on loopback; TLS belongs in front",
    "--headless": "a headless engine has no API server for gpud to supervise",
    "--api-server-count": "gpud supervises one API server per engine",
    "--enable-sleep-mode": "set the engine's `sleep_mode` setting instead",
    "--max-model-len": "set the model's `max_model_len` instead",
    "--kv-cache-memory-bytes": "set the model's `kv_cache` budget instead",
    "--gpu-memory-utilization": "set the model's `kv_cache` budget instead",
    "--config": "a vLLM config file could set any of these; put its options in `args`",
}


def _option_name(arg: str) -> str | None:
    """`--port=1` and `--port` -> `--port`; vLLM also accepts `--served_model_name`."""
    if not arg.startswith("--"):
        return None
    return arg.split("=", 1)[0].replace("_", "-")


def check_args(args: tuple[str, ...] | list[str]) -> list[str]:
    """One message per user arg that gpud must refuse; empty when all are fine."""
    errors: list[str] = []
    for i, arg in enumerate(args):
        name = _option_name(arg)
        if name is None:
            continue
        why = FORBIDDEN_ARGS.get(name)
        if why is not None:
            errors.append(f"args[{i}] {arg!r}: gpud sets {name} itself ({why}); remove it")
    return errors


@dataclass(frozen=True)
class EngineSpec:
    """The effective spec of one model's engine: everything that shapes its process."""

    model: str
    """The model's name in the file; also the served model name unless overridden."""
    command: tuple[str, ...]
    """The engine's argv prefix; the model source is appended right after it, e.g.
    ("vllm", "serve") or (".venv-vllm/bin/python", "-m", "...api_server", "--model")."""
    source: str
    """HF id or local path of the weights."""
    served_model_name: str | None = None
    gpu: int | None = None
    max_model_len: int | None = None
    sleep_mode: bool = False
    """--enable-sleep-mode: True on GPUs; vLLM refuses it on CPU."""
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float | None = None
    args: tuple[str, ...] = ()
    """The user's own args, passed last."""
    env: tuple[tuple[str, str], ...] = field(default=())
    """Extra environment, as sorted pairs so that equal specs hash equal."""

    def __post_init__(self) -> None:
        if not self.command:
            raise ValueError(f"model {self.model!r}: the engine command is empty")
        # Normalise order so that a dict's iteration order never changes the hash.
        object.__setattr__(self, "env", tuple(sorted(self.env)))

    @property
    def name(self) -> str:
        """The name clients use and the engine serves."""
        return self.served_model_name or self.model

    def canonical(self) -> dict[str, object]:
        """The fields that shape the process, as plain JSON data."""
        return {
            "model": self.model,
            "command": list(self.command),
            "source": self.source,
            "served_model_name": self.name,
            "gpu": self.gpu,
            "max_model_len": self.max_model_len,
            "sleep_mode": self.sleep_mode,
            "kv_cache_bytes": self.kv_cache_bytes,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "args": list(self.args),
            "env": [list(kv) for kv in self.env],
        }

    def spec_hash(self) -> str:
        """A stable 16-hex-digit digest of `canonical()`."""
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Environment gpud sets itself, for the same reason as FORBIDDEN_ARGS.
FORBIDDEN_ENV: dict[str, str] = {
    "CUDA_VISIBLE_DEVICES": "set the model's `gpu` instead",
    "VLLM_SERVER_DEV_MODE": "gpud needs the engine's /sleep and /wake_up endpoints",
}


def check_env(env: dict[str, str] | tuple[tuple[str, str], ...]) -> list[str]:
    """One message per env entry that gpud must refuse; empty when all are fine."""
    keys = env.keys() if isinstance(env, dict) else [k for k, _ in env]
    return [
        f"env {k!r}: gpud sets {k} itself ({FORBIDDEN_ENV[k]}); remove it"
        for k in keys
        if k in FORBIDDEN_ENV
    ]
