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

from gpud.config.engine_args import (  # noqa: F401 - re-exported
    FORBIDDEN_ARGS,
    FORBIDDEN_ENV,
    check_args,
    check_env,
    option_name,
)


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
