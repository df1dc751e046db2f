"""Footprints from files: estimates from a model's config.json (found where its engine looks),
the measured footprints gpud keeps in the state directory, GPU memory from a measurement.

The I/O half of the fit check (gpud.fit is the pure half): reads small JSON files, writes
one; never queries a GPU, never starts anything.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gpud.config.schema import GpudConfig, ModelConfig
from gpud.fit import (
    DEFAULT_GMU,
    NON_KV_BASE,
    NON_KV_SHARE,
    Footprint,
    GpuMemory,
    _text_config,
    bytes_per_parameter,
    kv_bytes_per_token,
    parameter_count,
)


def estimate_footprint(model_dir: Path | None, kv_bytes: int | None,
                       max_model_len: int | None) -> Footprint | None:
    """An estimate from the model's config.json; None when unknown (no local config.json,
    e.g. a Hugging Face id not downloaded yet, or one that is not a transformer's config).

    Weights: parameter count x dtype size. KV: the budget given, else the least vLLM starts
    with (one sequence of max_model_len tokens). Non-KV: NON_KV_BASE + NON_KV_SHARE x weights.
    """
    if model_dir is None:
        return None
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
        weights = math.ceil(parameter_count(cfg) * bytes_per_parameter(cfg))
        if kv_bytes is None:
            length = max_model_len or int(_text_config(cfg).get("max_position_embeddings") or 2048)
            kv_bytes = kv_bytes_per_token(cfg) * length
    except (OSError, ValueError, KeyError, TypeError):
        return None
    non_kv = NON_KV_BASE + int(weights * NON_KV_SHARE)
    return Footprint(weights, non_kv, kv_bytes, "estimated")


def locate_model_dir(source: str, hub_cache: Path | None = None) -> Path | None:
    """The local directory holding a model's config.json: the source itself when it is a
    directory, else the newest snapshot of a Hugging Face id in the hub cache, else None."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if source.count("/") != 1 or source.startswith(("/", ".", "~")):
        return None
    if hub_cache is None:
        hub_cache = hub_cache_of(os.environ)
    repo = hub_cache / ("models--" + source.replace("/", "--"))
    with contextlib.suppress(OSError):
        ref = (repo / "refs" / "main").read_text().strip()
        if (repo / "snapshots" / ref / "config.json").is_file():
            return repo / "snapshots" / ref
    snaps = sorted(repo.glob("snapshots/*/config.json"), key=lambda p: p.stat().st_mtime)
    return snaps[-1].parent if snaps else None


def hub_cache_of(env: Mapping[str, str]) -> Path:
    """The Hugging Face hub cache a process with this environment uses."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"])
    home = Path(env.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    return home / "hub"


def estimate_for(cfg: GpudConfig, model: str, gpu_total: int | None,
                 environ: Mapping[str, str] | None = None) -> Footprint | None:
    """The estimate the daemon and `gpud plan` share: the model's config.json found where its
    engine looks (the engine's and the model's env over gpud's: HF_HOME, HF_HUB_CACHE)."""
    m = cfg.models[model]
    env = {**(os.environ if environ is None else environ), **cfg.engines[m.engine].env, **m.env}
    return footprint_for(m, locate_model_dir(m.source, hub_cache_of(env)), gpu_total)


def footprint_for(m: ModelConfig, model_dir: Path | None,
                  gpu_total: int | None) -> Footprint | None:
    """The estimate for one model of the file: its KV budget (kv_cache, else kv_max), else
    what vLLM takes without one: gpu_memory_utilization (default 0.9) of the GPU."""
    kv = m.kv_cache if m.kv_cache is not None else m.kv_max
    fp = estimate_footprint(model_dir, kv, m.max_model_len)
    if fp is None or kv is not None or gpu_total is None:
        return fp
    share = m.gpu_memory_utilization or DEFAULT_GMU
    whole = int(gpu_total * share)
    return Footprint(fp.weights, fp.non_kv, max(fp.kv, whole - fp.weights - fp.non_kv),
                     "estimated")


def gpus_from_measure(memory: Mapping[str, Any]) -> dict[int, GpuMemory]:
    """GPU memory by index from `gpud.memory.measure()`'s answer (empty without NVML)."""
    return {int(g["index"]): GpuMemory(int(g["total"]), int(g["used"]), int(g["free"]))
            for g in memory.get("gpus", [])}


# --- the store of measured footprints ------------------------------------------------------


class FootprintStore:
    """Footprints by model, GPU and spec hash, in one JSON file in the state dir.

    A measurement replaces anything; an estimate never replaces a measurement. Unreadable
    or foreign content starts empty (the file is a cache: losing it costs estimates only).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._data: dict[str, Footprint] = {}
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            raw = {}
        if isinstance(raw, dict):
            for key, value in raw.get("footprints", {}).items():
                with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                    self._data[str(key)] = Footprint.from_json(value)

    @staticmethod
    def key(model: str, gpu: int | None, spec_hash: str) -> str:
        return f"{model}@{'cpu' if gpu is None else f'gpu{gpu}'}:{spec_hash}"

    def get(self, key: str) -> Footprint | None:
        return self._data.get(key)

    def best(self, key: str, estimate: Footprint | None) -> Footprint | None:
        """The measured footprint when there is one, else the estimate given."""
        known = self._data.get(key)
        return known if known is not None and known.source == "measured" else estimate

    def record(self, key: str, footprint: Footprint) -> bool:
        """Store it (written at once); False when an estimate would replace a measurement."""
        old = self._data.get(key)
        if old is not None and old.source == "measured" and footprint.source != "measured":
            return False
        if old == footprint:
            return True
        self._data[key] = footprint
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        body = {"version": 1, "footprints": {k: v.to_json() for k, v in sorted(self._data.items())}}
        tmp.write_text(json.dumps(body, indent=1) + "\n")
        os.replace(tmp, self.path)
        return True


# --- fit -----------------------------------------------------------------------------------
