"""Fit checks on data: victims chosen in the right order, pinned and busy models spared, an
impossible take reported instead of attempted, estimates from a real config.json, the store."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.desired import DesiredModel
from gpud.fit import Footprint, GiB, GpuMemory, fit, parameter_count
from gpud.footprints import (
    FootprintStore,
    estimate_footprint,
    gpus_from_measure,
    locate_model_dir,
)
from gpud.plan import ORDER, ObservedModel, apply, plan

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / ".state" / "models" / "tiny"


def d(key: str, state: str = "awake", gpu: int | None = 0, priority: int = 0,
      pinned: bool = False) -> DesiredModel:
    return DesiredModel(key=key, model=key, replica=0, state=state, reason="test",
                        spec_hash="h", gpu=gpu, priority=priority, pinned=pinned)


def o(state: str, gpu: int | None = 0) -> ObservedModel:
    return ObservedModel(state, "h", gpu)


def fp(awake_gib: float, asleep_gib: float = 1.0) -> Footprint:
    return Footprint(int(awake_gib * GiB), 0, 0, "estimated", int(asleep_gib * GiB))


def gpu(total_gib: float, used: int) -> GpuMemory:
    total = int(total_gib * GiB)
    return GpuMemory(total, used, total - used)


def held(obs: dict[str, ObservedModel], fps: dict[str, Footprint], g: int) -> int:
    return sum(
        fps[k].awake if v.state == "awake" else fps[k].asleep
        for k, v in obs.items() if v.gpu == g and v.state in ("awake", "asleep") and k in fps
    )


def run(desired: dict[str, DesiredModel], observed: dict[str, ObservedModel],
        fps: dict[str, Footprint], total_gib: float = 40, busy: frozenset[str] = frozenset(),
        idle: dict[str, float] | None = None, headroom: int = GiB):  # type: ignore[no-untyped-def]
    gpus = {0: gpu(total_gib, held(observed, fps, 0))}
    return fit(plan(desired, observed), desired, observed, gpus, fps, headroom, set(busy),
               idle=idle)


def steps(result) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    return [(a.action, a.model) for a in result.actions]


def test_a_plan_that_fits_comes_back_unchanged() -> None:
    desired = {"chat": d("chat", priority=10), "batch": d("batch", "asleep")}
    fps = {"chat": fp(16), "batch": fp(16)}
    result = run(desired, {}, fps)
    assert result.actions == plan(desired, {}).actions
    assert result.blocked == {} and result.notes == {}


def test_lowest_priority_idle_models_sleep_first_then_the_take() -> None:
    desired = {
        "big": d("big", priority=50),
        "low": d("low", priority=1), "lower": d("lower", priority=0),
        "also0": d("also0", priority=0), "mid": d("mid", priority=5),
    }
    observed = {k: o("awake") for k in ("low", "lower", "also0", "mid")}
    observed["big"] = o("unloaded")
    fps = {"big": fp(20), "low": fp(8), "lower": fp(8), "also0": fp(8), "mid": fp(8)}
    # 32 GiB held of 44, 1 GiB headroom: 11 free; big needs 20, each sleep frees 7.
    result = run(desired, observed, fps, total_gib=44)
    # Priority 0 first, names break the tie; two sleeps (11+14 >= 20) are enough.
    assert steps(result) == [("sleep", "also0"), ("sleep", "lower"), ("load", "big")]
    assert result.actions[0].reason == "making room for big on GPU 0"
    assert result.notes["lower"] == "slept to make room for big on GPU 0"
    assert result.blocked == {}


def test_longest_idle_goes_first_among_equal_priorities() -> None:
    desired = {"big": d("big", priority=9), "a": d("a"), "b": d("b")}
    observed = {"a": o("awake"), "b": o("awake")}
    fps = {"big": fp(20), "a": fp(10), "b": fp(10)}
    result = run(desired, observed, fps, total_gib=36, idle={"a": 5.0, "b": 600.0})
    assert steps(result) == [("sleep", "b"), ("load", "big")]


def test_pinned_and_busy_models_are_spared_and_unload_when_sleep_is_not_enough() -> None:
    desired = {
        "big": d("big", priority=9), "pinned": d("pinned", pinned=True),
        "busy": d("busy"), "idle": d("idle", "asleep"),
        "idle2": d("idle2"),
    }
    observed = {"pinned": o("awake"), "busy": o("awake"), "idle": o("asleep"),
                "idle2": o("awake")}
    fps = {"big": fp(20), "pinned": fp(8), "busy": fp(8), "idle": fp(8, 3), "idle2": fp(8, 3)}
    # held: 8 + 8 + 3 + 8 = 27 of 44 -> 17 free, 16 usable; sleeping idle2 gives 5 (21 >= 20).
    result = run(desired, observed, fps, total_gib=44, busy=frozenset({"busy"}))
    assert steps(result) == [("sleep", "idle2"), ("load", "big")]
    # Tighter: sleeping is not enough, so the lowest-priority idle ones are unloaded.
    result = run(desired, observed, fps, total_gib=41, busy=frozenset({"busy"}))
    assert steps(result) == [("unload", "idle"), ("sleep", "idle2"), ("load", "big")]
    assert {a.model for a in result.actions} & {"pinned", "busy"} == set()


def test_an_impossible_take_is_reported_not_attempted() -> None:
    desired = {"chat": d("chat", pinned=True), "batch": d("batch", priority=5)}
    observed = {"chat": o("awake"), "batch": o("asleep")}
    fps = {"chat": fp(17), "batch": Footprint(int(18.2 * GiB), 0, 0, "measured", GiB)}
    result = run(desired, observed, fps, total_gib=30)
    assert result.actions == ()
    assert result.blocked == {
        "batch": "needs 17.2 GiB on GPU 0 to wake, 11.0 GiB free "
                 "(keeping 1.0 GiB headroom); spared: chat (pinned)"
    }
    # Not pinned but still too small: the message says what sleeping it would leave.
    desired["chat"] = d("chat")
    result = run(desired, observed, fps, total_gib=19)
    assert result.actions == ()
    assert result.blocked["batch"] == ("needs 17.2 GiB on GPU 0 to wake, 17.0 GiB free "
                                       "after unloading chat (keeping 1.0 GiB headroom)")
    assert result.lines()[0].startswith("batch: needs 17.2 GiB")


def test_a_victim_never_evicts_back_so_replanning_settles() -> None:
    desired = {"chat": d("chat", priority=10), "batch": d("batch")}
    observed = {"chat": o("asleep"), "batch": o("awake")}
    fps = {"chat": fp(20), "batch": fp(20)}
    first = run(desired, observed, fps, total_gib=30)
    assert steps(first) == [("sleep", "batch"), ("wake", "chat")]
    after = apply(observed, first.actions, desired)
    second = run(desired, after, fps, total_gib=30)
    assert second.actions == () and "batch" in second.blocked  # batch waits, no ping-pong


def test_cpu_models_fit_and_unknown_footprints_pass_with_a_note() -> None:
    desired = {"cpu": d("cpu", gpu=None), "mystery": d("mystery")}
    result = run(desired, {}, {}, total_gib=1)
    assert steps(result) == [("load", "cpu"), ("load", "mystery")]
    assert "not checked" in result.notes["mystery"]


def test_takes_wait_while_their_gpu_is_in_transition() -> None:
    desired = {"a": d("a"), "b": d("b")}
    observed = {"a": o("starting")}
    result = run(desired, observed, {"a": fp(1), "b": fp(1)})
    assert result.actions == ()
    assert result.notes["b"] == "waiting for GPU 0 to settle (a is starting)"


def test_no_gpu_information_leaves_the_plan_alone() -> None:
    desired = {"a": d("a")}
    p = plan(desired, {})
    assert fit(p, desired, {}, {}, {"a": fp(100)}, GiB, set()).actions == p.actions


def test_gpus_from_nvml_measure() -> None:
    measured = {"gpus": [{"index": 1, "total": 80, "used": 30, "free": 50, "models": {}}]}
    assert gpus_from_measure(measured) == {1: GpuMemory(80, 30, 50)}
    assert gpus_from_measure({"gpus": [], "note": "no GPU"}) == {}


# --- estimates ----------------------------------------------------------------------------

LLAMA_8B = {
    "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 128256,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
    "torch_dtype": "bfloat16", "tie_word_embeddings": False, "max_position_embeddings": 131072,
}


def test_an_8b_llama_weighs_about_16_gb_in_bf16(tmp_path: Path) -> None:
    assert abs(parameter_count(LLAMA_8B) - 8.03e9) < 0.01e9
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    est = estimate_footprint(tmp_path, 8 * GiB, 8192)
    assert est is not None and est.source == "estimated"
    assert 15.9e9 < est.weights < 16.2e9
    assert est.kv == 8 * GiB
    assert 16e9 + 8 * GiB < est.awake < 16.2e9 + 8 * GiB + 3 * GiB
    # No KV budget: one sequence of max_model_len (128 KiB per token for this shape).
    floor = estimate_footprint(tmp_path, None, 8192)
    assert floor is not None and floor.kv == 8192 * 2 * 32 * 8 * 128 * 2
    # An fp32 copy weighs twice as much.
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_8B, "torch_dtype": "float32"}))
    est32 = estimate_footprint(tmp_path, 0, None)
    assert est32 is not None and est32.weights == 2 * est.weights


@pytest.mark.engine  # the tiny model is made with the engine's torch, in the slow phase
def test_estimate_matches_the_real_tiny_models_safetensors(tiny_model: Path) -> None:
    est = estimate_footprint(tiny_model, 0, 256)
    assert est is not None
    on_disk = (tiny_model / "model.safetensors").stat().st_size
    assert abs(est.weights - on_disk) / on_disk < 0.02


def test_unknown_without_a_local_config(tmp_path: Path) -> None:
    assert estimate_footprint(None, GiB, 4096) is None
    assert estimate_footprint(tmp_path, GiB, 4096) is None  # no config.json
    assert locate_model_dir("Qwen/Qwen3-8B", hub_cache=tmp_path) is None
    snap = tmp_path / "models--Qwen--Qwen3-8B" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(LLAMA_8B))
    (tmp_path / "models--Qwen--Qwen3-8B" / "refs").mkdir()
    (tmp_path / "models--Qwen--Qwen3-8B" / "refs" / "main").write_text("abc")
    assert locate_model_dir("Qwen/Qwen3-8B", hub_cache=tmp_path) == snap


# --- the store ----------------------------------------------------------------------------


def test_store_round_trip_and_measured_wins(tmp_path: Path) -> None:
    path = tmp_path / "state" / "footprints.json"
    store = FootprintStore(path)
    key = FootprintStore.key("chat", 0, "abc123")
    assert store.get(key) is None
    est = Footprint(16 * GiB, 2 * GiB, 8 * GiB, "estimated")
    measured = Footprint(15 * GiB, 3 * GiB, 8 * GiB, "measured", 700 * 1024**2)
    assert store.record(key, est)
    assert store.record(key, measured)
    assert not store.record(key, est)  # an estimate never replaces a measurement
    again = FootprintStore(path)
    assert again.get(key) == measured and again.get(key).asleep == 700 * 1024**2  # type: ignore[union-attr]
    assert again.best(key, est) == measured
    assert again.best(FootprintStore.key("chat", 1, "abc123"), est) == est
    path.write_text("{not json")
    assert FootprintStore(path).get(key) is None  # a broken cache costs estimates only


# --- properties ---------------------------------------------------------------------------

NAMES = ["a", "b", "c", "d", "e"]


@st.composite
def scenario(draw):  # type: ignore[no-untyped-def]
    keys = draw(st.lists(st.sampled_from(NAMES), unique=True, min_size=2, max_size=5))
    desired = {
        k: DesiredModel(key=k, model=k, replica=0,
                        state=draw(st.sampled_from(["awake", "asleep", "unloaded"])),
                        reason="t", spec_hash=draw(st.sampled_from(["h1", "h2"])),
                        gpu=draw(st.sampled_from([0, 0, 1, None])),
                        priority=draw(st.integers(0, 3)),
                        pinned=draw(st.integers(0, 4)) == 0)
        for k in keys
    }
    fps = {k: Footprint(draw(st.integers(1, 12)) * GiB, 0, 0, "estimated",
                        draw(st.integers(0, 2)) * GiB) for k in NAMES}
    totals = {g: draw(st.integers(8, 32)) * GiB for g in (0, 1)}
    other = {g: draw(st.integers(0, 4)) * GiB for g in (0, 1)}
    observed: dict[str, ObservedModel] = {}
    for k in draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=5)):
        g = draw(st.sampled_from([0, 1]))
        state = draw(st.sampled_from(["awake", "asleep", "unloaded"]))
        spec = draw(st.sampled_from(["h1", "h2"]))
        want = desired.get(k)
        if want and want.gpu is not None and want.state != "unloaded" and draw(st.integers(0, 3)):
            # mostly already as desired, often awake: the victims a take may pick
            state = "awake" if draw(st.booleans()) else want.state
            spec, g = want.spec_hash, want.gpu
        cand = {**observed, k: ObservedModel(state, spec, g, busy=draw(st.integers(0, 4)) == 0)}
        if held(cand, fps, g) + other[g] <= totals[g]:  # what is running fits physically
            observed = cand
    gpus = {g: GpuMemory(totals[g], held(observed, fps, g) + other[g],
                         totals[g] - held(observed, fps, g) - other[g]) for g in (0, 1)}
    return desired, observed, fps, gpus, other


@settings(max_examples=500, deadline=None)
@given(scenario(), st.integers(0, 2))
def test_applying_a_fitted_plan_never_overfills_a_gpu(case, headroom_gib) -> None:  # type: ignore[no-untyped-def]
    desired, observed, fps, gpus, other = case
    headroom = headroom_gib * GiB
    result = fit(plan(desired, observed), desired, observed, gpus, fps, headroom, set())
    now = dict(observed)
    for a in result.actions:
        now = apply(now, (a,), desired)
        if a.action in ("load", "wake", "restart"):
            g = now[a.model].gpu
            if g is not None:
                assert held(now, fps, g) + other[g] <= gpus[g].total - headroom, a
    # Victims are never pinned or busy, and only lower priorities make room.
    planned = {a.model for a in plan(desired, observed).actions}
    for a in result.actions:
        if a.model not in planned:
            assert not desired[a.model].pinned and not observed[a.model].busy
    # Frees come before takes on each GPU, as the planner orders them.
    firsts: dict[str, tuple[int | None, str]] = {}
    for a in result.actions:
        firsts.setdefault(a.model, (a.gpu, a.action))
    for g in {g for g, _ in firsts.values()}:
        phases = [ORDER[act] for gg, act in firsts.values() if gg == g]
        assert phases == sorted(phases)


@settings(max_examples=300, deadline=None)
@given(scenario())
def test_with_room_to_spare_fit_changes_nothing(case) -> None:  # type: ignore[no-untyped-def]
    desired, observed, fps, _, _ = case
    roomy = {0: GpuMemory(10**15, 0, 10**15), 1: GpuMemory(10**15, 0, 10**15)}
    p = plan(desired, observed)
    result = fit(p, desired, observed, roomy, fps, 0, set())
    assert result.actions == p.actions and not result.blocked
    after = apply(observed, result.actions, desired)
    assert not fit(plan(desired, after), desired, after, roomy, fps, 0, set()).actions


@settings(max_examples=300, deadline=None)
@given(scenario())
def test_fitted_plans_settle(case) -> None:  # type: ignore[no-untyped-def]
    # A victim never evicts its taker back; one slept only for a load-then-sleep's peak
    # wakes on the next pass. So a few passes reach a plan with nothing left to do.
    desired, observed, fps, gpus, other = case
    now = dict(observed)
    for _ in range(4):
        free = {g: m.total - held(now, fps, g) - other[g] for g, m in gpus.items()}
        cur = {g: GpuMemory(m.total, m.total - free[g], free[g]) for g, m in gpus.items()}
        result = fit(plan(desired, now), desired, now, cur, fps, 0, set())
        if not result.actions:
            return
        now = apply(now, result.actions, desired)
    raise AssertionError(f"still acting after 4 passes: {result}")


@st.composite
def crowded(draw):  # type: ignore[no-untyped-def]
    """GPU 0 full of running models; one more wants to load or wake there."""
    names = ["m0", "m1", "m2", "m3", "m4"]
    desired, observed, fps = {}, {}, {}
    for k in names:
        desired[k] = DesiredModel(key=k, model=k, replica=0, state="awake", reason="t",
                                  spec_hash="h", gpu=0, priority=draw(st.integers(0, 4)),
                                  pinned=draw(st.integers(0, 4)) == 0)
        fps[k] = Footprint(draw(st.integers(1, 10)) * GiB, 0, 0, "measured",
                           draw(st.integers(0, 1)) * GiB)
        observed[k] = ObservedModel(draw(st.sampled_from(["awake", "awake", "asleep"])), "h", 0,
                                    busy=draw(st.integers(0, 4)) == 0)
    new = draw(st.sampled_from(names))
    observed[new] = ObservedModel(draw(st.sampled_from(["unloaded", "asleep"])), "h", 0)
    for k in names:  # the others already run as desired: only the new take is planned
        if k != new:
            desired[k] = replace(desired[k], state=observed[k].state)
    other = draw(st.integers(0, 2)) * GiB
    used = held(observed, fps, 0) + other
    total = used + draw(st.integers(0, 12)) * GiB
    return desired, observed, fps, {0: GpuMemory(total, used, total - used)}, other, new


@settings(max_examples=400, deadline=None)
@given(crowded(), st.integers(0, 1))
def test_victims_are_lower_priority_idle_unpinned_and_each_frees_memory(case, hr) -> None:  # type: ignore[no-untyped-def]
    desired, observed, fps, gpus, other, new = case
    headroom = hr * GiB
    result = fit(plan(desired, observed), desired, observed, gpus, fps, headroom, set())
    victims = [a for a in result.actions if a.model != new]
    for a in victims:
        v = a.model
        assert not desired[v].pinned and not observed[v].busy
        assert desired[v].priority < desired[new].priority
        assert a.action in ("sleep", "unload") and a.reason == f"making room for {new} on GPU 0"
    took = any(a.model == new for a in result.actions)
    assert took != (new in result.blocked)
    if took:
        now = apply(observed, result.actions, desired)
        assert held(now, fps, 0) + other <= gpus[0].total - headroom
        # Every victim frees something: no sleep of a model that keeps all it holds.
        for a in victims:
            before = held({a.model: observed[a.model]}, fps, 0)
            after = held({a.model: now[a.model]}, fps, 0) if a.model in now else 0
            assert after < before, a
    else:
        # Blocked: even unloading every eligible model would not have made room.
        eligible = [k for k in desired if k != new and not desired[k].pinned
                    and not observed[k].busy and desired[k].priority < desired[new].priority]
        rest = {k: v for k, v in observed.items() if k not in eligible and k != new}
        need = fps[new].awake
        assert held(rest, fps, 0) + other + need > gpus[0].total - headroom
