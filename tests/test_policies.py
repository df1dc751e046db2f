"""Tests of the policy API, the shipped example policies and the runner.

The examples are called directly on hand-made views. The runner tests use real files in
a temporary directory and real worker processes: a script that raises, one that sleeps
5 s, one that spins, one that names a model gpud does not run, each disabled with a
reason a person can act on while a good script keeps working, and unsafe files refused.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import pytest

from gpud.policies.api import GpuView, Intent, ModelView, SetKvBudget, Sleep, View, Wake
from gpud.policies.runner import PolicyRunner, PolicyStatus

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30
NOW = datetime(2025, 6, 10, 14, 0, tzinfo=UTC)


def model(name: str, **fields: object) -> ModelView:
    values: dict[str, object] = {"state": "awake", "desired": "awake", "gpus": (0,)}
    values.update(fields)
    return ModelView(name, **values)  # type: ignore[arg-type]


def view(*models: ModelView, gpus: tuple[GpuView, ...] = ()) -> View:
    return View(now=NOW, active_profile="day", models=models, gpus=gpus)


def example(name: str) -> ModuleType:
    """A shipped example from policies/, imported the way a test can call it."""
    path = REPO / "policies" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def decide(name: str) -> Callable[[View], list[Intent]]:
    return example(name).decide  # type: ignore[no-any-return]


# -------------------------------------------------------------------------------- api


def test_intents_refuse_nonsense_with_the_model_named() -> None:
    with pytest.raises(ValueError, match=r"Sleep\('chat'\): level must be 1 or 2"):
        Sleep("chat", 3, "why")
    with pytest.raises(ValueError, match="model must be a model name"):
        Wake("", "why")
    with pytest.raises(ValueError, match=r"SetKvBudget\('chat'\): bytes must be"):
        SetKvBudget("chat", -1, "why")
    assert Wake("chat", "why").state == "awake" and Sleep("c", 2, "").state == "asleep"


def test_view_lookups_name_what_exists() -> None:
    snapshot = view(model("chat"), gpus=(GpuView(0, 80 * GIB, 10 * GIB),))
    assert snapshot.model("chat").name == "chat"
    assert snapshot.gpu(0).used_bytes == 70 * GIB
    with pytest.raises(KeyError, match=r"no model 'nope' in this view \(known: chat\)"):
        snapshot.model("nope")


# ---------------------------------------------------------------------- idle_sleep.py


def test_idle_sleep_uses_the_file_ttl_and_leaves_busy_models_alone() -> None:
    intents = decide("idle_sleep")(
        view(
            model("chat", idle_seconds=901, idle_sleep_after=900, sleep_level=2),
            model("fresh", idle_seconds=10, idle_sleep_after=900),
            model("busy", idle_seconds=5000, idle_sleep_after=900, in_flight=1),
            model("queued", idle_seconds=5000, idle_sleep_after=900, queued=2),
            model("asleep", state="asleep", idle_seconds=5000, idle_sleep_after=900),
            model("no-ttl", idle_seconds=5000),
        )
    )
    assert intents == [Sleep("chat", 2, "idle for 901 s (TTL 900 s)")]


def test_idle_sleep_per_model_ttl_overrides_the_file() -> None:
    module = example("idle_sleep")
    module.TTL_SECONDS["batch"] = 60
    intents = module.decide(view(model("batch", idle_seconds=61, idle_sleep_after=3600)))
    assert intents == [Sleep("batch", 1, "idle for 61 s (TTL 60 s)")]


# ------------------------------------------------------------------- wake_on_queue.py


def test_wake_on_queue_wakes_sleepers_at_their_depth() -> None:
    module = example("wake_on_queue")
    module.QUEUE_DEPTH["chat"] = 1
    intents = module.decide(
        view(
            model("chat", state="asleep", desired="asleep", queued=1),
            model("batch", state="asleep", desired="asleep", queued=3),  # default depth 4
            model("big", state="asleep", desired="asleep", queued=9),
            model("awake", queued=50),
        )
    )
    assert intents == [
        Wake("chat", "1 requests queued (wakes at 1)"),
        Wake("big", "9 requests queued (wakes at 4)"),
    ]


# ----------------------------------------------------------------- memory_pressure.py


def test_memory_pressure_sleeps_the_lowest_priority_idle_model() -> None:
    intents = decide("memory_pressure")(
        view(
            model(
                "chat", state="asleep", priority=100, gpu_bytes=1 * GIB, awake_gpu_bytes=21 * GIB
            ),
            model("batch", priority=10, gpu_bytes=30 * GIB, idle_seconds=50),
            model("summary", priority=50, gpu_bytes=30 * GIB, idle_seconds=5000),
            model("busy-low", priority=1, gpu_bytes=30 * GIB, in_flight=3),
            model("elsewhere", priority=0, gpu_bytes=30 * GIB, gpus=(1,)),
            gpus=(GpuView(0, 80 * GIB, 5 * GIB), GpuView(1, 80 * GIB, 5 * GIB)),
        )
    )
    assert [(i.model, type(i)) for i in intents] == [("batch", Sleep)]
    assert "make room for chat (priority 100 > 10)" in intents[0].reason


def test_memory_pressure_does_nothing_when_it_fits_or_cannot_fit() -> None:
    policy = decide("memory_pressure")
    fits = view(
        model("chat", state="asleep", priority=100, awake_gpu_bytes=10 * GIB),
        model("batch", priority=10, gpu_bytes=30 * GIB),
        gpus=(GpuView(0, 80 * GIB, 20 * GIB),),
    )
    assert policy(fits) == []
    hopeless = view(
        model("chat", state="asleep", priority=100, awake_gpu_bytes=70 * GIB),
        model("batch", priority=10, gpu_bytes=30 * GIB),
        gpus=(GpuView(0, 80 * GIB, 5 * GIB),),
    )
    assert policy(hopeless) == []  # sleeping batch would free 30 of the 65 GiB missing
    equal = view(
        model("chat", state="asleep", priority=10, awake_gpu_bytes=20 * GIB),
        model("batch", priority=10, gpu_bytes=30 * GIB),
        gpus=(GpuView(0, 80 * GIB, 5 * GIB),),
    )
    assert policy(equal) == []  # only strictly lower priorities make room


def test_memory_pressure_takes_as_many_as_needed_and_counts_queued_sleepers() -> None:
    intents = decide("memory_pressure")(
        view(
            model(
                "chat",
                state="asleep",
                desired="asleep",
                queued=2,
                priority=100,
                awake_gpu_bytes=40 * GIB,
            ),
            model("a", priority=1, gpu_bytes=20 * GIB, idle_seconds=10),
            model("b", priority=1, gpu_bytes=20 * GIB, idle_seconds=99),
            model("c", priority=5, gpu_bytes=20 * GIB),
            gpus=(GpuView(0, 80 * GIB, 0),),
        )
    )
    assert [i.model for i in intents] == ["b", "a"]  # lowest priority, longest idle first


# ------------------------------------------------------------------------------ runner

GOOD = """
from gpud.policies.api import Wake

def decide(view):
    return [Wake("chat", f"profile {view.active_profile}")]
"""
RAISES = """
def decide(view):
    total = 0
    return [1 / total]
"""
SLEEPS = """
import os, time
from pathlib import Path

def decide(view):
    Path(__file__).with_suffix(".pid").write_text(str(os.getpid()))
    time.sleep(5)
    return []
"""
SPINS = """
def decide(view):
    while True:
        pass
"""
GHOST = """
from gpud.policies.api import Sleep

def decide(view):
    return [Sleep("ghost", 1, "spooky")]
"""


def write(directory: Path, name: str, source: str, mode: int = 0o644) -> Path:
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    path.chmod(mode)
    return path


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    return directory


@pytest.fixture
def runner(policy_dir: Path) -> Iterator[PolicyRunner]:
    with PolicyRunner(policy_dir, timeout=0.2, load_timeout=10) as policies:
        yield policies


def by_name(statuses: list[PolicyStatus]) -> dict[str, PolicyStatus]:
    return {s.name: s for s in statuses}


def test_bad_policies_are_disabled_with_a_reason_and_a_good_one_keeps_working(
    runner: PolicyRunner, policy_dir: Path
) -> None:
    for name, source in [
        ("good", GOOD),
        ("raises", RAISES),
        ("sleeps", SLEEPS),
        ("spins", SPINS),
        ("ghost", GHOST),
    ]:
        write(policy_dir, name, source)
    assert all(s.enabled for s in runner.reload())

    started = time.monotonic()
    intents, statuses = runner.evaluate(view(model("chat")))
    took = time.monotonic() - started

    assert intents == [Wake("chat", "profile day", policy="good")]
    status = by_name(statuses)
    assert status["good"].enabled and status["good"].error is None
    assert status["good"].last_intents == 1
    raises = status["raises"].error or ""
    assert "decide() raised ZeroDivisionError: division by zero (line 4, in decide)" in raises
    assert f"disabled until {policy_dir / 'raises.py'} changes" in raises
    for slow in ("sleeps", "spins"):
        assert "decide() did not return within 200 ms" in (status[slow].error or "")
    assert "returned Sleep for model 'ghost', which gpud does not run (models: chat)" in (
        status["ghost"].error or ""
    )
    assert not any(status[n].enabled for n in ("raises", "sleeps", "spins", "ghost"))
    # The 5 s sleeper was cut at the limit, not waited for, and its process is gone.
    assert took < 1.5
    pid = int((policy_dir / "sleeps.pid").read_text())
    assert not Path(f"/proc/{pid}").exists()

    # The next round runs only the good one, and fast.
    started = time.monotonic()
    intents, statuses = runner.evaluate(view(model("chat")))
    assert intents == [Wake("chat", "profile day", policy="good")]
    assert time.monotonic() - started < 0.2
    assert [s.name for s in statuses if s.enabled] == ["good"]


def test_a_disabled_policy_comes_back_when_its_file_changes(
    runner: PolicyRunner, policy_dir: Path
) -> None:
    path = write(policy_dir, "flaky", RAISES)
    runner.reload()
    runner.evaluate(view(model("chat")))
    assert not by_name(runner.reload())["flaky"].enabled  # unchanged file: stays disabled

    write(policy_dir, "flaky", GOOD)
    assert by_name(runner.reload())["flaky"].enabled
    intents, _ = runner.evaluate(view(model("chat")))
    assert intents == [Wake("chat", "profile day", policy="flaky")]

    # Touching the file is enough to retry (same bytes, new mtime).
    write(policy_dir, "flaky", RAISES)
    runner.reload()
    runner.evaluate(view(model("chat")))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert by_name(runner.reload())["flaky"].enabled


def test_world_writable_policy_is_refused_and_others_still_run(
    runner: PolicyRunner, policy_dir: Path
) -> None:
    write(policy_dir, "good", GOOD)
    open_file = write(policy_dir, "open", GHOST, mode=0o666)
    status = by_name(runner.reload())
    assert not status["open"].enabled
    assert status["open"].error == (
        f"refused: policy file {open_file} is writable by group or others (mode 0666), so "
        f"anyone could change what gpud runs: chmod go-w {open_file}"
    )
    intents, _ = runner.evaluate(view(model("chat")))
    assert [i.policy for i in intents] == ["good"]

    open_file.chmod(0o664)  # group-writable is refused too
    assert "writable by group or others (mode 0664)" in (
        by_name(runner.reload())["open"].error or ""
    )
    open_file.chmod(0o644)
    assert by_name(runner.reload())["open"].enabled


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another uid needs root")
def test_files_of_other_owners_and_open_directories_are_refused(policy_dir: Path) -> None:
    path = write(policy_dir, "theirs", GOOD)
    os.chown(path, 12345, -1)
    with PolicyRunner(policy_dir, allowed_uids={0}) as runner:
        error = by_name(runner.reload())["theirs"].error or ""
        assert f"policy file {path} is owned by uid 12345; only files owned by root" in error
    with PolicyRunner(policy_dir, allowed_uids={0, 12345}) as runner:
        assert by_name(runner.reload())["theirs"].enabled
        policy_dir.chmod(0o777)
        error = by_name(runner.reload())["theirs"].error or ""
        assert f"the policies directory {policy_dir} is writable by group or others" in error
        assert not by_name(runner.statuses())["theirs"].enabled


def test_loading_errors_are_reported(policy_dir: Path) -> None:
    write(policy_dir, "syntax", "def decide(view)\n    return []\n")
    write(policy_dir, "nodecide", "X = 1\n")
    write(policy_dir, "slowimport", "import time\ntime.sleep(5)\ndef decide(view): return []\n")
    write(policy_dir, "exits", "import os\ndef decide(view):\n    os._exit(3)\n")
    write(policy_dir, "notalist", "def decide(view):\n    return 'wake chat'\n")
    write(policy_dir, "junk", "def decide(view):\n    return [('Wake', 'chat')]\n")
    write(policy_dir, "_helper", "raise SystemExit('never loaded')\n")
    with PolicyRunner(policy_dir, load_timeout=0.5) as runner:
        status = by_name(runner.reload())
        assert "_helper" not in status
        assert "loading failed: " in (status["syntax"].error or "")
        assert "SyntaxError" in (status["syntax"].error or "")
        assert "has no decide(view) function" in (status["nodecide"].error or "")
        assert "loading took longer than 0.5 s" in (status["slowimport"].error or "")
        status = by_name(runner.evaluate(view(model("chat")))[1])
        assert "its worker process exited with status 3" in (status["exits"].error or "")
        assert "decide() returned 'wake chat' (a str); return a list of intents" in (
            status["notalist"].error or ""
        )
        assert "returned ('Wake', 'chat') (a tuple) at index 0; every item must be one of" in (
            status["junk"].error or ""
        )


def test_removed_policy_disappears(runner: PolicyRunner, policy_dir: Path) -> None:
    path = write(policy_dir, "good", GOOD)
    assert [s.name for s in runner.reload()] == ["good"]
    path.unlink()
    assert runner.reload() == []
    assert runner.evaluate(view(model("chat"))) == ([], [])


def test_no_directory_means_no_policies(tmp_path: Path) -> None:
    with PolicyRunner(tmp_path / "missing") as runner:
        assert runner.reload() == []


def test_shipped_examples_run_in_the_runner(policy_dir: Path) -> None:
    for path in sorted((REPO / "policies").glob("*.py")):
        shutil.copy(path, policy_dir / path.name)
        (policy_dir / path.name).chmod(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
    with PolicyRunner(policy_dir) as runner:
        assert {s.name: s.enabled for s in runner.reload()} == {
            "idle_sleep": True,
            "memory_pressure": True,
            "wake_on_queue": True,
        }
        intents, statuses = runner.evaluate(
            view(
                model("chat", state="asleep", priority=100, awake_gpu_bytes=20 * GIB, queued=5),
                model(
                    "batch", priority=1, gpu_bytes=30 * GIB, idle_seconds=700, idle_sleep_after=600
                ),
                gpus=(GpuView(0, 80 * GIB, 5 * GIB),),
            )
        )
        assert all(s.enabled for s in statuses), statuses
        assert sorted((i.policy, type(i).__name__, i.model) for i in intents) == [
            ("idle_sleep", "Sleep", "batch"),
            ("memory_pressure", "Sleep", "batch"),
            ("wake_on_queue", "Wake", "chat"),
        ]


# A script runs inside its worker and can make it send any bytes as its answer: here it
# swaps the worker's json module, as a hostile or broken script could (issue 21, item 4).
ANSWERS = """
import sys, types
ANSWER = {answer}
sys.modules["__main__"].json = types.SimpleNamespace(dumps=lambda obj: ANSWER)

def decide(view):
    return []
"""
HOSTILE = {
    "deep": "'[' * 200_000 + ']' * 200_000",
    "deep_in_an_intent": "'{\"intents\": [{\"kind\": \"Sleep\", \"model\": \"chat\", "
                         "\"level\": 1, \"reason\": ' + '[' * 100_000 + ']' * 100_000 + '}]}'",
    "huge": "'\"' + 'x' * (5 << 20) + '\"'",
    "huge_error": "'{\"error\": \"' + 'x' * (3 << 20) + '\"}'",
    "not_utf8": "types.SimpleNamespace(encode=lambda: b'\\xff\\xfe\\x00[')",
    "wrong_types": "'{\"intents\": [{\"kind\": \"Sleep\", \"model\": [\"chat\"], "
                   "\"level\": \"one\", \"reason\": {\"a\": [1, [2, [3, [4]]]]}}]}'",
    "kind_is_a_list": "'{\"intents\": [{\"kind\": [[[[1]]]]}, 5]}'",
    "nan": "'{\"intents\": NaN}'",
}


def test_any_answer_costs_only_its_policy_with_a_short_reason(
    runner: PolicyRunner, policy_dir: Path
) -> None:
    write(policy_dir, "good", GOOD)
    for name, answer in HOSTILE.items():
        write(policy_dir, name, ANSWERS.format(answer=answer))
    assert all(s.enabled for s in runner.reload())
    intents, statuses = runner.evaluate(view(model("chat")))
    assert intents == [Wake("chat", "profile day", policy="good")]
    status = by_name(statuses)
    for name in HOSTILE:
        error = status[name].error or ""
        assert not status[name].enabled and f"disabled until {policy_dir / name}.py" in error
        assert len(error) < 1000, (name, len(error))
    assert "not JSON gpud can read (RecursionError)" in (status["deep"].error or "")
    assert "more than 4 MiB" in (status["huge"].error or "")
    # The loop goes on: the good one keeps running, and a fixed script loads.
    write(policy_dir, "deep", GOOD)
    assert by_name(runner.reload())["deep"].enabled
    intents, _ = runner.evaluate(view(model("chat")))
    assert [i.policy for i in intents] == ["deep", "good"]
