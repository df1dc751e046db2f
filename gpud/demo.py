"""`gpud demo`: two tiny real models, a config that names them, and the daemon in the foreground.

The models are random-weight Llamas made once (cached in the demo's state dir) with the engine's
own interpreter; the engines are real vLLM servers. Prints the config path, the status URL and a
curl command, each on its own line, so that scripts can read them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from gpud.engines.models import ModelBuildError, ensure_tiny_model

REPO = Path(__file__).resolve().parent.parent


def vllm_python() -> Path:
    """The interpreter of the engine's virtualenv: $GPUD_VLLM_PYTHON, ./.venv-vllm, the repo's."""
    env = os.environ.get("GPUD_VLLM_PYTHON")
    candidates = [Path(env)] if env else []
    candidates += [Path.cwd() / ".venv-vllm/bin/python", REPO / ".venv-vllm/bin/python"]
    for c in candidates:
        if c.exists():
            return c.absolute()
    raise SystemExit("gpud demo: no vLLM virtualenv found (.venv-vllm); run `make demo`, which "
                     "creates it, or set GPUD_VLLM_PYTHON")


def demo_config(state: Path, python: Path, listen: str, models: dict[str, Path]) -> str:
    engine = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model"]
    lines = [
        "# gpud demo: two tiny random-weight models served by real vLLM (CPU build).",
        "# Edit this file while the demo runs: gpud applies the change within a second.",
        "[daemon]",
        f'listen = "{listen}"',
        f'state_dir = "{state}"',
        f'runtime_dir = "{state / "run"}"',
        'tick = "2s"',
        "",
        "[engines.vllm]",
        "command = [" + ", ".join(f'"{part}"' for part in engine) + "]",
        "sleep_mode = false   # vLLM's CPU build refuses --enable-sleep-mode; sleep still works",
        'startup_timeout = "5m"',
        "# nobind: the CPU build would otherwise pin every engine's worker to core 0",
        'env = { VLLM_CPU_KVCACHE_SPACE = "1", VLLM_CPU_OMP_THREADS_BIND = "nobind" }',
        "",
    ]
    for name, state_name in (("chat", "awake"), ("batch", "asleep")):
        lines += [
            f"[models.{name}]",
            f'source = "{models[name]}"',
            f'state = "{state_name}"',
            "max_model_len = 256",
            'args = ["--enforce-eager"]',
            "",
        ]
    return "\n".join(lines)


def run_demo(state: Path | None, *, listen: str = "127.0.0.1:8080") -> int:
    state = (state or Path.cwd() / ".state/demo").absolute()
    state.mkdir(parents=True, exist_ok=True)
    python = vllm_python()
    try:
        models = {name: ensure_tiny_model(state / "models" / name, python, seed=i)
                  for i, name in enumerate(("chat", "batch"))}
    except ModelBuildError as exc:
        print(f"gpud demo: {exc}", file=sys.stderr)
        return 1
    config = state / "gpud.toml"
    config.write_text(demo_config(state, python, listen, models))
    host, _, port = listen.rpartition(":")
    url = f"http://{host}:{port}"
    print(f"config: {config}")
    print(f"status: {url}/")
    print(f"try: curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' "
          "-d '{\"model\": \"batch\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], "
          "\"max_tokens\": 16}'")
    print("(the batch model is asleep: that request wakes it; Ctrl-C stops the demo and its "
          "engines)", flush=True)
    from gpud.daemon import run_daemon

    return run_daemon(config, stop_engines_on_exit=True)
