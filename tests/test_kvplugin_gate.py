"""The plugin's gate: inert without gpud's socket, one greppable refusal for any vLLM but
0.26.0 and for out-of-scope setups; patches wait for their module's import; the engine env."""

from __future__ import annotations

import importlib.metadata
import logging
import sys
import types
from pathlib import Path

import pytest

import gpud_vllm
from gpud.kvpool.engine_env import pool_engine_env
from gpud_vllm import gate, patch


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpud_vllm, "_registered", False)
    monkeypatch.setattr(patch, "install", lambda: pytest.fail("patches installed"))


def fake_vllm(monkeypatch: pytest.MonkeyPatch, version: str | None) -> None:
    def fake(dist: str) -> str:
        if dist == "vllm" and version is not None:
            return version
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(importlib.metadata, "version", fake)


def test_does_nothing_without_gpuds_socket(monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("GPUD_KV_SOCKET", raising=False)
    fake_vllm(monkeypatch, "0.32.0")
    gpud_vllm.register()
    assert not caplog.records


@pytest.mark.parametrize("version", ["0.32.0", "0.25.1", "0.26.1", None])
def test_refuses_any_other_vllm_with_one_line(monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture,
                                              version: str | None) -> None:
    monkeypatch.setenv("GPUD_KV_SOCKET", "/run/gpud/kvpool.sock")
    fake_vllm(monkeypatch, version)
    before = list(sys.meta_path)
    with caplog.at_level(logging.ERROR, "vllm.gpud_kv"), \
            pytest.raises(gate.KVPluginRefusedError) as err:
        gpud_vllm.register()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("gpud-kv: refused: ")
    assert "\n" not in lines[0] and "0.26.0" in lines[0]
    assert str(err.value) == lines[0]
    assert sys.meta_path == before and not gpud_vllm._registered


def test_accepts_0_26_0_and_installs_patches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUD_KV_SOCKET", "/run/gpud/kvpool.sock")
    fake_vllm(monkeypatch, "0.26.0+cu130")
    calls: list[int] = []
    monkeypatch.setattr(patch, "install", lambda: calls.append(1))
    gpud_vllm.register()
    gpud_vllm.register()
    assert calls == [1]


def test_out_of_scope_setups_each_say_why() -> None:
    assert gate.setup_problems(gate.EngineFacts(block_bytes=64 * 1024)) == []
    cases = {
        "tensor parallel 2": gate.EngineFacts(tensor_parallel=2),
        "KV connector 'NixlConnector'": gate.EngineFacts(kv_connector="NixlConnector"),
        "hybrid/mamba": gate.EngineFacts(hybrid=True),
        "2 KV cache groups": gate.EngineFacts(kv_groups=2),
        "MLAAttentionSpec": gate.EngineFacts(kv_spec="MLAAttentionSpec"),
        "does not divide": gate.EngineFacts(block_bytes=80 * 1024),
    }
    for needle, facts in cases.items():
        (problem,) = gate.setup_problems(facts)
        assert needle in problem
    line = gate.refusal_line(gate.setup_problems(
        gate.EngineFacts(tensor_parallel=2, kv_connector="X")))
    assert line.startswith(gate.REFUSED) and "\n" not in line and ";" in line


def test_patches_wait_for_their_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "gpudkv_fake_mod.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen: list[int] = []
    patch.when_imported("gpudkv_fake_mod", lambda m: seen.append(m.VALUE))
    assert seen == []
    import gpudkv_fake_mod  # noqa: F401

    assert seen == [1]
    patch.when_imported("gpudkv_fake_mod", lambda m: seen.append(2))  # already imported
    assert seen == [1, 2]
    sys.modules.pop("gpudkv_fake_mod")
    sys.meta_path.remove(patch._finder)


def test_patch_layer_imports_without_vllm_or_torch() -> None:
    assert "vllm" not in sys.modules and "torch" not in sys.modules
    assert set(patch.PATCHES) >= {
        "vllm.v1.worker.gpu.attn_utils", "vllm.v1.worker.gpu_model_runner",
        "vllm.v1.core.kv_cache_coordinator", "vllm.v1.core.kv_cache_manager",
        "vllm.device_allocator.sleep_mode_backend",
    }
    assert isinstance(types.ModuleType, type)


def test_engine_env_for_a_pool_model(tmp_path: Path) -> None:
    e = pool_engine_env("chat", 1, tmp_path, kv_min=None, kv_max=8 * 1024**3)
    assert e.env == {"GPUD_KV_SOCKET": str(tmp_path / "kvpool.sock"),
                     "GPUD_TENANT": "chat", "GPUD_GPU": "1"}
    assert e.kv_cache_bytes == 8 * 1024**3
    assert pool_engine_env("m", None, tmp_path, kv_min=6 * 1024**3,
                           kv_max=None).kv_cache_bytes == 6 * 1024**3
    with pytest.raises(ValueError):
        pool_engine_env("m", 0, tmp_path, kv_min=None, kv_max=0)
