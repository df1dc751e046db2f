"""`gpud check --box`: a valid file on a box that cannot run it (issue 18, Must-show 3).

Each case is a real `gpud check --box` run on a real file: a missing engine binary, a local
source that is gone, a Hugging Face id that resolves nowhere, a port another server holds.
Each must exit non-zero and name the key, the problem and the fix.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# A stand-in engine command that runs quickly: `python -m json.tool` (the box check imports
# the module and asks its package's version, as it does for vLLM's api_server).
QUICK_ENGINE = [sys.executable, "-m", "json.tool", "--model"]


def gpud(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpud.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120, env={**os.environ, **(env or {})})


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


@pytest.fixture
def listen_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write(tmp_path: Path, port: int, *, command: list[str] | None = None,
          source: str, extra: str = "") -> Path:
    cmd = ", ".join(json.dumps(c) for c in (command or QUICK_ENGINE))
    path = tmp_path / "gpud.toml"
    path.write_text(
        f'[daemon]\nlisten = "127.0.0.1:{port}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'runtime_dir = "{tmp_path / "run"}"\nport_range = "28000-28099"\n'
        f"[engines.vllm]\ncommand = [{cmd}]\n"
        f'[models.chat]\nsource = "{source}"\n{extra}')
    return path


def lines_about(out: str, where: str) -> list[str]:
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if f" {where}: " in line:
            return lines[i:i + 2]
    raise AssertionError(f"nothing about {where} in:\n{out}")


def test_a_box_that_can_run_the_file_is_ready(tmp_path: Path, model_dir: Path,
                                               listen_port: int) -> None:
    r = gpud("check", "--box", str(write(tmp_path, listen_port, source=str(model_dir))))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "box: ready" in r.stdout
    assert f"{model_dir} is a local model" in r.stdout
    assert f"127.0.0.1:{listen_port} is free" in r.stdout


def test_missing_engine_binary(tmp_path: Path, model_dir: Path, listen_port: int) -> None:
    path = write(tmp_path, listen_port, command=["vllm-not-installed-here", "serve"],
                 source=str(model_dir))
    r = gpud("check", "--box", str(path))
    assert r.returncode == 1
    what, fix = lines_about(r.stdout, "engines.vllm.command")
    assert "FAIL" in what and "'vllm-not-installed-here' is not found on PATH" in what
    assert "fix: write the absolute path" in fix and "/opt/vllm/bin/python" in fix
    r = gpud("check", "--box", str(write(tmp_path, listen_port, source=str(model_dir),
                                         command=[str(tmp_path / "no" / "python"), "-m", "x"])))
    assert r.returncode == 1 and f"{tmp_path / 'no' / 'python'}' is not found" in r.stdout


def test_an_engine_that_cannot_import_its_module(tmp_path: Path, model_dir: Path,
                                                 listen_port: int) -> None:
    path = write(tmp_path, listen_port, source=str(model_dir),
                 command=[sys.executable, "-m", "vllm_is_not_in_this_venv.api", "--model"])
    r = gpud("check", "--box", str(path))
    assert r.returncode == 1
    what, fix = lines_about(r.stdout, "engines.vllm.command")
    assert "failed: ModuleNotFoundError: No module named 'vllm_is_not_in_this_venv'" in what
    assert "fix: reinstall vLLM" in fix


def test_missing_local_source(tmp_path: Path, listen_port: int) -> None:
    gone = tmp_path / "models" / "gone"
    r = gpud("check", "--box", str(write(tmp_path, listen_port, source=str(gone))))
    assert r.returncode == 1
    assert "models.chat.source" in r.stderr and f"{gone} does not exist" in r.stderr
    assert "a Hugging Face id is written ORG/NAME" in r.stderr  # the fix: the other form
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    r = gpud("check", "--box", str(write(tmp_path, listen_port, source=str(not_a_model))))
    assert r.returncode == 1
    what, fix = lines_about(r.stdout, "models.chat.source")
    assert "has no config.json" in what and "fix: point source at the directory" in fix


def test_unresolvable_hf_id(tmp_path: Path, listen_port: int) -> None:
    """Not in the engine's cache (its own HF_HOME) and no way to download it."""
    hf_home = tmp_path / "hf"
    path = write(tmp_path, listen_port, source="acme/no-such-model",
                 extra=f'env = {{ HF_HOME = "{hf_home}", HF_HUB_OFFLINE = "1" }}\n')
    r = gpud("check", "--box", str(path))
    assert r.returncode == 1
    what, fix = lines_about(r.stdout, "models.chat.source")
    assert f"acme/no-such-model is not in the cache at {hf_home / 'hub'}" in what
    assert f"fix: download it first: HF_HOME={hf_home} huggingface-cli download " \
           "acme/no-such-model" in fix
    # once it is in that cache, it resolves (the engine's cache, not the CLI user's)
    snap = hf_home / "hub" / "models--acme--no-such-model" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    r = gpud("check", "--box", str(path))
    assert r.returncode == 0, r.stdout
    assert "is in the engine's Hugging Face cache" in r.stdout


def test_unreachable_hub_is_named(tmp_path: Path, listen_port: int) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused at once
    endpoint = f"http://127.0.0.1:{dead.getsockname()[1]}"
    path = write(tmp_path, listen_port, source="acme/chat",
                 extra=f'env = {{ HF_HOME = "{tmp_path}/hf", HF_ENDPOINT = "{endpoint}" }}\n')
    r = gpud("check", "--box", str(path))
    dead.close()
    assert r.returncode == 1
    what, fix = lines_about(r.stdout, "models.chat.source")
    assert "huggingface.co cannot be reached" in what and "Connection refused" in what
    assert "with HF_TOKEN for a gated model" in fix


def test_port_in_use(tmp_path: Path, model_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = gpud("check", "--box", str(write(tmp_path, port, source=str(model_dir))))
    assert r.returncode == 1
    what, fix = lines_about(r.stdout, "daemon.listen")
    assert f"port {port} on 127.0.0.1 is in use" in what
    assert f"ss -ltnp 'sport = :{port}'" in fix and "set [daemon] listen" in fix


def test_gpus_the_driver_does_not_show(tmp_path: Path, model_dir: Path,
                                       listen_port: int) -> None:
    if Path("/dev/nvidia7").exists():
        pytest.skip("this box has a GPU 7")
    r = gpud("check", "--box", str(write(tmp_path, listen_port, source=str(model_dir),
                                         extra="gpu = 7\n")))
    assert r.returncode == 1
    assert "GPU 7 is not visible (no /dev/nvidia7)" in r.stdout


def test_json_names_each_problem(tmp_path: Path, listen_port: int) -> None:
    path = write(tmp_path, listen_port, command=["nope", "serve"], source="acme/x",
                 extra=f'env = {{ HF_HOME = "{tmp_path}/hf", HF_HUB_OFFLINE = "1" }}\n')
    r = gpud("check", "--box", "--json", str(path))
    assert r.returncode == 1
    data = json.loads(r.stdout)
    failed = {p["where"]: p for p in data["box"] if p["severity"] == "error"}
    assert set(failed) == {"engines.vllm.command", "models.chat.source"}
    assert all(p["fix"] for p in failed.values())
    r = gpud("check", "--json", str(tmp_path / "missing.toml"))
    assert r.returncode == 1 and json.loads(r.stdout)["valid"] is False


@pytest.mark.engine
def test_the_vllm_cpu_engine_command_runs(tmp_path: Path, tiny_model: Path,
                                          listen_port: int) -> None:
    """The real engine virtualenv: its api_server module imports and says its version."""
    from engine_fixtures import VLLM_COMMAND

    r = gpud("check", "--box", str(write(tmp_path, listen_port, command=list(VLLM_COMMAND),
                                         source=str(tiny_model))))
    assert r.returncode == 0, r.stdout
    assert "runs (vLLM 0.32.0)" in r.stdout
