"""What gpud adds to a pool model's engine: the plugin's environment and its KV capacity.

An engine of a model with ``kv_pool = true`` (or a ``kv_min``/``kv_max``) runs gpud's
vLLM plugin (package ``gpud_vllm``): it finds gpud's page socket in
``GPUD_KV_SOCKET``, says which model it serves with ``GPUD_TENANT`` and which pool
with ``GPUD_GPU`` (the GPU's index on the box; inside the engine
``CUDA_VISIBLE_DEVICES`` makes it device 0), and gets ``--kv-cache-memory-bytes`` set
to the model's kv_max: vLLM sizes its *virtual* KV cache from it and the plugin backs
it with pool pages as load grows.

Pure: no I/O, no CUDA. The reconciler puts ``env`` into the engine spec's env and
``kv_cache_bytes`` into its ``kv_cache_bytes``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ENV_SOCKET = "GPUD_KV_SOCKET"
ENV_TENANT = "GPUD_TENANT"
ENV_GPU = "GPUD_GPU"
SOCKET_NAME = "kvpool.sock"  # setup.build_server's socket, in the runtime directory
# A pool model with only kv_min (or only kv_pool = true) still needs a virtual size.
DEFAULT_POOL_KV_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class PoolEngineEnv:
    env: Mapping[str, str]
    kv_cache_bytes: int


def pool_engine_env(
    model: str,
    gpu: int | None,
    runtime_dir: Path,
    *,
    kv_min: int | None,
    kv_max: int | None,
    default_kv_bytes: int = DEFAULT_POOL_KV_BYTES,
) -> PoolEngineEnv:
    """The env and KV capacity of ``model``'s engine on gpud's pool.

    The capacity is kv_max; without one, the larger of kv_min and ``default_kv_bytes``.
    """
    if not model:
        raise ValueError("a pool engine needs its model's name")
    if kv_max is not None and kv_max <= 0:
        raise ValueError(f"model {model!r}: kv_max must be > 0 for the pool")
    capacity = kv_max if kv_max is not None else max(kv_min or 0, default_kv_bytes)
    return PoolEngineEnv(
        env={
            ENV_SOCKET: str(runtime_dir / SOCKET_NAME),
            ENV_TENANT: model,
            ENV_GPU: str(gpu or 0),
        },
        kv_cache_bytes=capacity,
    )
