"""Fit checks: before gpud loads or wakes a model, does it fit on its GPU, and what must make room?

Pure core: never imports asyncio, aiohttp, subprocess or cuda and never queries a GPU; the
memory of each GPU comes in as a mapping (NVML lives in `gpud.memory`), footprints as
data (`gpud.footprints` reads config.json files and keeps the measured ones on disk).

`fit(plan, ...)` takes the planner's plan and returns the plan that is safe to run: takes
(load, wake, restart) that fit stay; for one that does not, lower-priority idle models on that
GPU are slept (or unloaded when sleeping is not enough) first, never a pinned or busy one; a
take that still does not fit is dropped and reported in `blocked` instead of being attempted.
When everything fits, the plan comes back unchanged (so "apply, then replan is empty" holds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Literal

from gpud.desired import DesiredModel
from gpud.plan import FREES, ORDER, Action, ObservedModel, Plan
from gpud.states import RUNNING, TRANSITIONAL

GiB = 1024**3
MiB = 1024**2

# What vLLM's sleep mode leaves on the GPU (levels 1 and 2 alike: weights go to host memory or
# are dropped, the KV cache is freed): the CUDA context, cuBLAS/NCCL workspaces, allocator
# pools. Without a measurement we assume 1 GiB (a guess meant to be on the high side, not yet
# checked on a GPU), so a sleep is not counted as freeing more than it does.
ASLEEP_ESTIMATE = 1 * GiB
# Non-KV memory of an awake engine besides the weights (CUDA context, activation peak while
# profiling, CUDA graphs): a base plus a share of the weights, ~2.3 GiB for an 8B model. An
# assumption, not yet checked on a GPU; a measured footprint replaces it after the first run.
NON_KV_BASE = 3 * GiB // 2
NON_KV_SHARE = 0.05
# vLLM's default --gpu-memory-utilization: without a KV budget it takes this share of the GPU.
DEFAULT_GMU = 0.9

DTYPE_BYTES = {
    "float32": 4, "float": 4, "fp32": 4, "float16": 2, "half": 2, "fp16": 2, "bfloat16": 2,
    "bf16": 2, "float8": 1, "float8_e4m3fn": 1, "fp8": 1, "int8": 1,
}
# Architectures whose MLP has two matrices (up, down) rather than the gated three.
UNGATED = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "starcoder2", "bert"}


@dataclass(frozen=True)
class GpuMemory:
    """One GPU's memory now, in bytes, as NVML reports it."""

    total: int
    used: int
    free: int


@dataclass(frozen=True)
class Footprint:
    """What one engine of a model holds on its GPU, in bytes."""

    weights: int
    non_kv: int  # everything else that is not the KV cache: context, activations, graphs
    kv: int
    source: Literal["measured", "estimated"]
    sleeping: int | None = None  # measured while asleep, when known

    @property
    def awake(self) -> int:
        return self.weights + self.non_kv + self.kv

    @property
    def asleep(self) -> int:
        """What stays on the GPU while asleep: measured, else ASLEEP_ESTIMATE (see above)."""
        if self.sleeping is not None:
            return min(self.sleeping, self.awake)
        return min(ASLEEP_ESTIMATE, self.awake)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"weights": self.weights, "non_kv": self.non_kv, "kv": self.kv,
                               "source": self.source}
        if self.sleeping is not None:
            out["sleeping"] = self.sleeping
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Footprint:
        source = data.get("source")
        if source not in ("measured", "estimated"):
            raise ValueError(f"footprint source {source!r} is not measured or estimated")
        sleeping = data.get("sleeping")
        return cls(int(data["weights"]), int(data["non_kv"]), int(data["kv"]), source,
                   None if sleeping is None else int(sleeping))


def measured_footprint(awake: int, kv: int, weights: int | None = None,
                       asleep: int | None = None) -> Footprint:
    """A footprint from what an engine really held: its GPU bytes awake (NVML, whole process
    group), its KV budget, and the weights when the engine's log says them (else estimated
    as what is left after the KV cache and NON_KV_BASE)."""
    rest = max(0, awake - kv)
    w = min(rest, weights) if weights is not None else max(0, rest - NON_KV_BASE)
    return Footprint(w, rest - w, min(kv, awake), "measured", asleep)


# --- estimates from config.json ------------------------------------------------------------


def _text_config(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    # Multimodal models keep the language model's shape under text_config / llm_config.
    if "hidden_size" not in cfg:
        for key in ("text_config", "llm_config", "language_config"):
            sub = cfg.get(key)
            if isinstance(sub, Mapping) and "hidden_size" in sub:
                return {**sub, **{k: v for k, v in cfg.items() if k == "quantization_config"}}
    return cfg


def parameter_count(cfg: Mapping[str, Any]) -> int:
    """Parameters of a decoder-only transformer from its Hugging Face config.json fields."""
    c = _text_config(cfg)
    h = int(c["hidden_size"])
    layers = int(c["num_hidden_layers"])
    vocab = int(c["vocab_size"])
    inter = int(c.get("intermediate_size") or 4 * h)
    heads = int(c.get("num_attention_heads") or max(1, h // 128))
    kv_heads = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or h // heads)
    attn = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2  # q, o; k, v
    mats = 2 if c.get("model_type") in UNGATED else 3
    experts = c.get("num_local_experts") or c.get("num_experts") or c.get("n_routed_experts")
    if experts:
        moe_inter = int(c.get("moe_intermediate_size") or inter)
        shared = int(c.get("n_shared_experts") or 0) * moe_inter
        shared += int(c.get("shared_expert_intermediate_size") or 0)
        mlp = mats * h * (int(experts) * moe_inter + shared) + h * int(experts)  # + router
    else:
        mlp = mats * h * inter
    per_layer = attn + mlp + 2 * h  # two norms
    embed = vocab * h
    tied = bool(c.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False)))
    return layers * per_layer + embed * (1 if tied else 2) + h


def bytes_per_parameter(cfg: Mapping[str, Any]) -> float:
    q = cfg.get("quantization_config")
    if isinstance(q, Mapping):
        bits = q.get("bits") or q.get("weight_bits") or q.get("num_bits")
        if isinstance(bits, int) and bits > 0:
            return bits / 8
        if str(q.get("quant_method", "")).lower() in ("fp8", "fbgemm_fp8"):
            return 1.0
    c = _text_config(cfg)
    dtype = c.get("torch_dtype") or c.get("dtype") or cfg.get("torch_dtype") or cfg.get("dtype")
    return float(DTYPE_BYTES.get(str(dtype).removeprefix("torch."), 2))


def kv_bytes_per_token(cfg: Mapping[str, Any], kv_dtype_bytes: int | None = None) -> int:
    c = _text_config(cfg)
    heads = int(c.get("num_attention_heads") or 1)
    kv_heads = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or int(c["hidden_size"]) // heads)
    size = kv_dtype_bytes or max(1, round(bytes_per_parameter({k: v for k, v in cfg.items()
                                                                if k != "quantization_config"})))
    return 2 * int(c["num_hidden_layers"]) * kv_heads * head_dim * size


@dataclass(frozen=True)
class FitResult:
    actions: tuple[Action, ...]
    notes: dict[str, str] = field(default_factory=dict)  # victims, unchecked, waiting
    blocked: dict[str, str] = field(default_factory=dict)  # takes dropped: why

    def lines(self) -> list[str]:
        """One "MODEL: why" line per blocked model, then per note, for people."""
        return [f"{k}: {v}" for k, v in sorted(self.blocked.items())] + [
            f"{k}: {v}" for k, v in sorted(self.notes.items())]


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _names(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


class _Fitter:
    def __init__(self, desired: Mapping[str, DesiredModel], observed: Mapping[str, ObservedModel],
                 gpus: Mapping[int, GpuMemory], footprints: Mapping[str, Footprint],
                 headroom: int, busy: AbstractSet[str], idle: Mapping[str, float],
                 acted: set[str]) -> None:
        self.desired, self.gpus, self.fps, self.headroom = desired, gpus, footprints, headroom
        self.busy = set(busy) | {k for k, o in observed.items() if o.busy}
        self.idle, self.acted = idle, acted
        self.state = {k: o.state for k, o in observed.items()}
        self.where = {k: o.gpu for k, o in observed.items()}
        self.free = {g: m.free for g, m in gpus.items()}
        self.unsettled: dict[int, list[str]] = {}
        for k, o in sorted(observed.items()):
            if o.state in TRANSITIONAL and o.gpu is not None:
                self.unsettled.setdefault(o.gpu, []).append(f"{k} is {o.state}")
        self.victims: dict[str, Action] = {}
        self.notes: dict[str, str] = {}
        self.blocked: dict[str, str] = {}

    def held(self, key: str) -> int:
        fp = self.fps.get(key)
        state = self.state.get(key, "unloaded")
        if fp is None or state not in RUNNING:
            return 0
        return fp.awake if state == "awake" else fp.asleep

    def release(self, key: str, to: str) -> None:
        """Move a model to asleep or unloaded, crediting its GPU with what that frees."""
        g = self.where.get(key)
        before = self.held(key)
        self.state[key] = to
        if g in self.free:
            # An estimate may exceed what the model really holds: never more free than the
            # GPU has in all (else a model larger than the GPU would seem to fit).
            self.free[g] = min(self.gpus[g].total, self.free[g] + before - self.held(key))

    def run_chain(self, chain: list[Action]) -> bool:
        """Account for one model's actions in order; False when a take cannot run."""
        for a in chain:
            k = a.model
            if a.action == "sleep":
                self.release(k, "asleep")
            elif a.action == "unload":
                self.release(k, "unloaded")
            elif a.action in ("load", "restart", "wake"):
                d = self.desired.get(k)
                if a.action == "restart":
                    self.release(k, "unloaded")
                target = self.where.get(k) if a.action == "wake" else (d.gpu if d else a.gpu)
                if target is None:
                    target = a.gpu
                fp = self.fps.get(k)
                need = 0 if fp is None else fp.awake - self.held(k)
                if not self.take(k, target, need, fp is None, a.action):
                    return False
                self.state[k], self.where[k] = "awake", target
        return True

    def take(self, key: str, g: int | None, need: int, unknown: bool, verb: str) -> bool:
        if g is None:
            return True  # CPU engines always fit
        if g not in self.gpus:
            known = ", ".join(str(i) for i in sorted(self.gpus))
            self.blocked[key] = f"GPU {g} does not exist on this box (GPUs: {known})"
            return False
        if self.unsettled.get(g):
            self.notes[key] = f"waiting for GPU {g} to settle ({'; '.join(self.unsettled[g])})"
            return False
        if unknown:
            self.notes[key] = (f"fit on GPU {g} not checked: its footprint is unknown "
                               "(never measured, no local config.json)")
            return True
        if need <= self.free[g] - self.headroom:
            self.free[g] -= need
            return True
        return self.make_room(key, g, need, verb)

    def candidates(self, key: str, g: int) -> tuple[list[str], list[str]]:
        mine = self.desired[key].priority if key in self.desired else 0
        ok, spared = [], []
        for v, state in sorted(self.state.items()):
            if v == key or self.where.get(v) != g or state not in RUNNING:
                continue
            if v in self.acted:
                continue  # the plan moves it already
            d = self.desired.get(v)
            why = None
            if d is None:
                continue
            if d.pinned:
                why = "pinned"
            elif v in self.busy:
                why = "busy"
            elif d.priority >= mine:
                why = f"priority {d.priority}"
            elif v not in self.fps:
                why = "footprint unknown"
            if why:
                if self.held(v):
                    spared.append(f"{v} ({why})")
                continue
            ok.append(v)
        ok.sort(key=lambda v: (self.desired[v].priority, -self.idle.get(v, 0.0), v))
        return ok, spared

    def make_room(self, key: str, g: int, need: int, verb: str) -> bool:
        victims, spared = self.candidates(key, g)
        avail = self.free[g] - self.headroom
        # Estimates may claim more than the GPU holds: nothing frees past its total.
        cap = self.gpus[g].total - self.headroom
        gain = 0
        plan: dict[str, str] = {}
        for v in victims:  # sleep first: cheap to undo
            if need <= min(cap, avail + gain):
                break
            fp = self.fps[v]
            if self.state[v] == "awake" and fp.awake > fp.asleep:
                plan[v], gain = "sleep", gain + fp.awake - fp.asleep
        for v in victims:  # then unload, lowest priority first
            if need <= min(cap, avail + gain):
                break
            # what unloading adds: the sleeping remainder, or all it holds now
            extra = self.fps[v].asleep if plan.get(v) == "sleep" else self.held(v)
            if extra > 0:
                plan[v], gain = "unload", gain + extra
        if need > min(cap, avail + gain):
            gain = min(gain, cap - avail)
            what = f"needs {gib(need)} on GPU {g}" + (" to wake" if verb == "wake" else "")
            after = self._after(plan)
            msg = f"{what}, {gib(max(0, avail + gain))} free{after}"
            if self.headroom:
                msg += f" (keeping {gib(self.headroom)} headroom)"
            if spared:
                msg += "; spared: " + ", ".join(spared)
            self.blocked[key] = msg
            return False
        for v, act in plan.items():
            d = self.desired[v]
            reason = f"making room for {key} on GPU {g}"
            level = d.sleep_level if act == "sleep" else None
            self.victims[v] = Action(act, v, reason, g, level)
            self.release(v, "asleep" if act == "sleep" else "unloaded")
            done = "slept" if act == "sleep" else "unloaded"
            self.notes[v] = f"{done} to make room for {key} on GPU {g}"
        self.free[g] -= need
        return True

    @staticmethod
    def _after(plan: Mapping[str, str]) -> str:
        slept = [v for v, a in plan.items() if a == "sleep"]
        unloaded = [v for v, a in plan.items() if a == "unload"]
        parts = ([f"sleeping {_names(slept)}"] if slept else []) + (
            [f"unloading {_names(unloaded)}"] if unloaded else [])
        return " after " + " and ".join(parts) if parts else ""


def fit(plan: Plan, desired: Mapping[str, DesiredModel], observed: Mapping[str, ObservedModel],
        gpus: Mapping[int, GpuMemory], footprints: Mapping[str, Footprint], headroom: int,
        busy: AbstractSet[str], *, idle: Mapping[str, float] | None = None) -> FitResult:
    """The plan that is safe to run on these GPUs, with victims and blocked takes explained.

    `footprints` and `busy` are by instance key; `busy` holds models with requests in flight
    or queued (ObservedModel.busy counts too); `idle` (seconds since the last request, when
    known) picks the longest idle victim among equal priorities, else names decide. With no
    GPU memory known (no NVML) the plan is returned as is. While a model on a GPU is in a
    transitional state (starting, sleeping, ...) NVML's numbers for that GPU are moving, so
    takes there wait for a later pass (a note says so). The caller must run the plan in order
    per GPU: the frees (the plan's and the victims') finish before a take on that GPU starts.
    """
    if not gpus:
        return FitResult(plan.actions)
    chains: dict[str, list[Action]] = {}
    for a in plan.actions:
        chains.setdefault(a.model, []).append(a)
    f = _Fitter(desired, observed, gpus, footprints, headroom, busy, idle or {}, set(chains))
    kept: list[list[Action]] = []
    for key, chain in chains.items():
        saved = (f.state.get(key), f.where.get(key), dict(f.free))
        if f.run_chain(chain):
            kept.append(chain)
        else:  # a restart released its old engine in the books: put it back
            state, where, f.free = saved
            if state is not None:
                f.state[key], f.where[key] = state, where
    if not f.victims and len(kept) == len(chains):
        return FitResult(plan.actions, f.notes, f.blocked)
    prio = {k: d.priority for k, d in desired.items()}
    frees = [c for c in kept if c[0].action in FREES] + [[a] for a in f.victims.values()]
    frees.sort(key=lambda c: (ORDER[c[0].action], -1 if c[0].gpu is None else c[0].gpu,
                              -prio.get(c[0].model, 0), c[0].model))
    rest = [c for c in kept if c[0].action not in FREES]
    return FitResult(tuple(a for c in frees + rest for a in c), f.notes, f.blocked)
