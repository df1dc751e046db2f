"""The pure planner, on data: convergence, idempotence, ordering, no needless restarts."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.config.schema import GpudConfig
from gpud.desired import DesiredModel, Layers, Override, effective
from gpud.plan import ORDER, ObservedModel, apply, plan

NAMES = ["a", "b", "c", "d", "e"]
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def desired_st() -> st.SearchStrategy[dict[str, DesiredModel]]:
    def build(entries: dict[str, tuple[str, int, str, int]]) -> dict[str, DesiredModel]:
        return {
            k: DesiredModel(key=k, model=k, replica=0, state=s, reason="test", spec_hash=h,
                            gpu=g, priority=p)
            for k, (s, g, h, p) in entries.items()
        }

    entry = st.tuples(st.sampled_from(["awake", "asleep", "unloaded"]), st.integers(0, 1),
                      st.sampled_from(["h1", "h2"]), st.integers(0, 3))
    return st.dictionaries(st.sampled_from(NAMES), entry).map(build)


def observed_st() -> st.SearchStrategy[dict[str, ObservedModel]]:
    entry = st.builds(ObservedModel, st.sampled_from(["unloaded", "awake", "asleep"]),
                      st.sampled_from(["h1", "h2", None]), st.integers(0, 1))
    return st.dictionaries(st.sampled_from(NAMES), entry)


def states(obs: dict[str, ObservedModel]) -> dict[str, str]:
    return {k: o.state for k, o in obs.items() if o.state != "unloaded"}


@settings(max_examples=400)
@given(desired_st(), observed_st())
def test_applying_a_plan_reaches_desired_and_replanning_is_empty(desired, observed) -> None:  # type: ignore[no-untyped-def]
    result = plan(desired, observed)
    after = apply(observed, result.actions, desired)
    want = {k: d.state for k, d in desired.items() if d.state != "unloaded"}
    assert states(after) == want
    for k, d in desired.items():
        if d.state != "unloaded":
            assert after[k].spec_hash == d.spec_hash
    assert not plan(desired, after).actions


@settings(max_examples=400)
@given(desired_st(), observed_st())
def test_on_each_gpu_memory_is_freed_before_it_is_taken(desired, observed) -> None:  # type: ignore[no-untyped-def]
    result = plan(desired, observed)
    firsts: list[tuple[int | None, str]] = []
    seen: set[str] = set()
    for a in result.actions:
        if a.model not in seen:
            seen.add(a.model)
            firsts.append((a.gpu, a.action))
    for gpu in {g for g, _ in firsts}:
        phases = [ORDER[act] for g, act in firsts if g == gpu]
        assert phases == sorted(phases)


@settings(max_examples=400)
@given(desired_st(), observed_st())
def test_a_model_whose_spec_did_not_change_is_never_restarted(desired, observed) -> None:  # type: ignore[no-untyped-def]
    for a in plan(desired, observed).actions:
        if a.action == "restart":
            assert observed[a.model].spec_hash != desired[a.model].spec_hash
        if a.action in ("restart", "unload", "load"):
            o = observed.get(a.model)
            d = desired.get(a.model)
            if o and d and o.state != "unloaded" and o.spec_hash == d.spec_hash:
                assert a.action == "unload" and d.state == "unloaded"


def test_transitional_and_failed_models_are_left_alone() -> None:
    d = {k: DesiredModel(k, k, 0, "awake", "r", "h1", 0) for k in ("a", "b")}
    obs = {"a": ObservedModel("starting", "h1", 0), "b": ObservedModel("failed", "h1", 0)}
    result = plan(d, obs)
    assert result.actions == ()
    assert result.waiting == {"a": "starting"}
    obs["b"] = ObservedModel("failed", "old", 0)  # a new spec retries
    assert [a.action for a in plan(d, obs).actions] == ["load"]


def cfg() -> GpudConfig:
    return GpudConfig.model_validate({
        "models": {
            "chat": {"source": "/m/chat", "gpu": 0, "state": "awake", "priority": 10},
            "batch": {"source": "/m/batch", "gpu": 0, "state": "asleep"},
        },
        "profiles": {"night": {"chat": "asleep", "batch": {"state": "awake", "replicas": 2}}},
    })


def test_layers_precedence_and_reasons() -> None:
    c = cfg()
    base = effective(c, Layers(), NOW)
    assert base["chat"].state == "awake" and base["chat"].reason == "file says awake"
    night = effective(c, Layers(profile="night"), NOW)
    assert night["chat"].state == "asleep" and night["chat"].layer == "profile"
    assert night["batch#1"].state == "awake"
    ov = Override(state="awake", reason="wake by an operator")
    forced = effective(c, Layers(profile="night", overrides={"chat": ov}), NOW)
    assert forced["chat"].state == "awake" and forced["chat"].layer == "override"


def test_swapping_two_models_only_sleeps_and_wakes() -> None:
    c = cfg()
    day = effective(c, Layers(), NOW)
    running = apply({}, plan(day, {}).actions, day)
    swapped = effective(c, Layers(profile="night"), NOW)
    actions = [(a.action, a.model) for a in plan(swapped, running).actions]
    # chat sleeps first (frees GPU 0), then batch wakes; batch's 2nd replica loads.
    assert actions[0] == ("sleep", "chat")
    assert ("wake", "batch") in actions and ("load", "batch#1") in actions
    assert not any(a == "restart" for a, _ in actions)


def test_spec_change_restarts_only_that_model() -> None:
    c = cfg()
    day = effective(c, Layers(), NOW)
    running = apply({}, plan(day, {}).actions, day)
    data = c.model_dump()
    data["models"]["chat"]["max_model_len"] = 4096
    changed = effective(GpudConfig.model_validate(data), Layers(), NOW)
    assert [(a.action, a.model) for a in plan(changed, running).actions] == [("restart", "chat")]
