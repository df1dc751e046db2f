"""User args and env that would take an engine out of gpud's control: refused at check time.

Pure data and string checks; the config validator and the engine layer share them.
"""

from __future__ import annotations

# Options gpud sets itself and the reason a user may not: each would break routing,
# health checks, adoption or sleep/wake.
FORBIDDEN_ARGS: dict[str, str] = {
    "--port": "gpud allocates each engine's port from its configured range",
    "--host": "engines listen on loopback only; the proxy is the public endpoint",
    "--uds": "gpud reaches engines over TCP on loopback",
    "--served-model-name": "the model's name is its key in the [models] table",
    "--model": "set the model's `source` instead",
    "--api-key": "the engine must answer gpud's health and sleep calls; use [[auth.keys]]",
    "--root-path": "gpud's proxy and health checks expect the engine's API at /",
    "--ssl-keyfile": "gpud talks plain HTTP to engines on loopback; TLS belongs in front",
    "--ssl-certfile": "gpud talks plain HTTP to engines on loopback; TLS belongs in front",
    "--headless": "a headless engine has no API server for gpud to supervise",
    "--api-server-count": "gpud supervises one API server per engine",
    "--enable-sleep-mode": "set the engine's `sleep_mode` setting instead",
    "--max-model-len": "set the model's `max_model_len` instead",
    "--kv-cache-memory-bytes": "set the model's `kv_cache` budget instead",
    "--gpu-memory-utilization": "set the model's `kv_cache` budget instead",
    "--config": "a vLLM config file could set any of these; put its options in `args`",
}


def option_name(arg: str) -> str | None:
    """`--port=1` and `--port` -> `--port`; vLLM also accepts `--served_model_name`."""
    if not arg.startswith("--"):
        return None
    return arg.split("=", 1)[0].replace("_", "-")


def check_args(args: tuple[str, ...] | list[str]) -> list[str]:
    """One message per user arg that gpud must refuse; empty when all are fine."""
    errors: list[str] = []
    for i, arg in enumerate(args):
        name = option_name(arg)
        if name is None:
            continue
        why = FORBIDDEN_ARGS.get(name)
        if why is not None:
            errors.append(f"args[{i}] {arg!r}: gpud sets {name} itself ({why}); remove it")
    return errors


FORBIDDEN_ENV: dict[str, str] = {
    "CUDA_VISIBLE_DEVICES": "set the model's `gpu` instead",
    "VLLM_SERVER_DEV_MODE": "gpud needs the engine's /sleep and /wake_up endpoints",
}


def check_env(env: dict[str, str] | tuple[tuple[str, str], ...]) -> list[str]:
    """One message per env entry that gpud must refuse; empty when all are fine."""
    keys = env.keys() if isinstance(env, dict) else [k for k, _ in env]
    return [
        f"env {k!r}: gpud sets {k} itself ({FORBIDDEN_ENV[k]}); remove it"
        for k in keys
        if k in FORBIDDEN_ENV
    ]


# vLLM's OpenAI server modules. Their parser takes a positional `model_tag`, but only
# `vllm serve` uses it: run as a module, the source after the command lands there unused
# and vLLM serves its default model (Qwen/Qwen3-0.6B), downloading it first. Silently.
API_SERVER_MODULES = ("vllm.entrypoints.openai.api_server",
                      "vllm.entrypoints.launchers.api_server.entry")


def command_problem(command: list[str] | tuple[str, ...]) -> str | None:
    """Why this engine command would not start the model it is given, or None.

    gpud appends the source right after the command (`gpud.engines.vllm.build_argv`), so
    `vllm serve` takes it as its positional model and a command ending in `--model` takes it
    as that option's value; vLLM's api_server module takes it as nothing at all.
    """
    parts = list(command)
    if "-m" not in parts[:-1]:
        return None
    module = parts[parts.index("-m") + 1]
    if module in API_SERVER_MODULES and parts[-1] != "--model":
        return (f"`-m {module}` takes the model only as --model: without it the model's "
                "source is a stray positional and vLLM serves its default model instead; "
                'end the command with "--model", e.g. ["/opt/vllm/bin/python", "-m", '
                f'"{module}", "--model"], or use ["/opt/vllm/bin/vllm", "serve"]')
    return None
