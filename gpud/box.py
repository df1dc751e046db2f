"""`gpud check --box`: can this machine run this file? Checked before a model is loaded.

`gpud check` reads the file; a file can be valid and still fail on the box: an engine command
that is not on the PATH systemd gives gpud, a local source that is gone, a Hugging Face id
that is neither in the engine's cache nor downloadable (no network, a gated repo without a
token), a GPU the driver does not show, a port another server holds. At run time each of
those is a crash loop; here each is one line with where, what and the fix.

Reads files, runs the engine command once with `--version` (or imports its module), binds
ports and may ask huggingface.co about an id; never starts an engine, never writes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gpud.cli_fmt import paint
from gpud.config import GpudConfig
from gpud.config.load import LOCAL_SOURCE
from gpud.footprints import hub_cache_of, locate_model_dir

VERSION_TIMEOUT = 120.0  # importing vLLM takes 5-20 s; a hung command is a problem too
HF_TIMEOUT = 8.0


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" (the model will not run), "warning", or "ok" (checked, fine)
    where: str  # the key in the file: engines.vllm.command, models.chat.source, ...
    what: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        return {"severity": self.severity, "where": self.where, "what": self.what,
                "fix": self.fix}


def check_box(cfg: GpudConfig, env: Mapping[str, str] | None = None,
              hf_timeout: float = HF_TIMEOUT) -> list[Problem]:
    """Every check, in the file's order: engines, models' sources, GPUs, ports, dirs."""
    env = dict(os.environ if env is None else env)
    out: list[Problem] = []
    used = {m.engine for m in cfg.models.values()}
    for name, engine in cfg.engines.items():
        if name in used:
            out.append(_engine_runs(name, engine.command, {**env, **engine.env}))
    for name, m in cfg.models.items():
        engine_env = {**env, **cfg.engines[m.engine].env, **m.env}
        out.append(_source(name, m.source, engine_env, hf_timeout))
    out += _gpus(cfg)
    out += _ports(cfg)
    out += _dirs(cfg)
    return out


# --- the engine command -------------------------------------------------------------------


def _engine_runs(name: str, command: list[str], env: Mapping[str, str]) -> Problem:
    where = f"engines.{name}.command"
    exe = command[0]
    path = env.get("PATH", os.defpath)
    found = exe if os.sep in exe else shutil.which(exe, path=path)
    if found is None or not os.path.exists(found):
        return Problem("error", where, f"{exe!r} is not found"
                       + ("" if os.sep in exe else f" on PATH ({path})"),
                       "write the absolute path to the engine's virtualenv, e.g. command = "
                       '["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server", '
                       '"--model"]; under systemd PATH does not hold /opt/vllm/bin')
    if not os.access(found, os.X_OK):
        return Problem("error", where, f"{found} is not executable", f"chmod +x {found}")
    probe = _version_argv(found, command)
    try:
        done = subprocess.run(probe, env=dict(env), capture_output=True, text=True,
                              timeout=VERSION_TIMEOUT, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return Problem("error", where, f"`{' '.join(probe)}` did not answer within "
                       f"{VERSION_TIMEOUT:g}s", "run it by hand and see where it hangs")
    except OSError as exc:
        return Problem("error", where, f"{found} cannot be run: {exc.strerror or exc}",
                       "check its #! line and that its virtualenv is complete")
    said = (done.stdout.strip() or done.stderr.strip()).splitlines()
    if done.returncode != 0:
        last = said[-1] if said else f"exit code {done.returncode}"
        return Problem("error", where, f"`{' '.join(probe)}` failed: {last}",
                       "reinstall vLLM in that virtualenv, or point command at one that works")
    version = said[-1] if said else "ok"
    return Problem("ok", where, f"{found} runs (vLLM {version})")


def _version_argv(exe: str, command: list[str]) -> list[str]:
    """`python -m vllm...` -> import vllm and print its version; `vllm serve` -> --version."""
    if "-m" in command[1:]:
        module = command[command.index("-m") + 1] if command.index("-m") + 1 < len(
            command) else "vllm"
        top = module.split(".")[0]
        return [exe, "-c", f"import importlib, {top}; importlib.import_module({module!r}); "
                f"print(getattr({top}, '__version__', '?'))"]
    return [exe, "--version"]


# --- sources ------------------------------------------------------------------------------


def _source(name: str, source: str, env: Mapping[str, str], hf_timeout: float) -> Problem:
    where = f"models.{name}.source"
    if source.startswith(LOCAL_SOURCE):
        path = Path(source).expanduser()
        if not path.exists():
            return Problem("error", where, f"{path} does not exist",
                           "copy the model there, or write its Hugging Face id (ORG/NAME)")
        if path.is_dir() and not (path / "config.json").is_file():
            return Problem("error", where, f"{path} has no config.json: not a model directory",
                           "point source at the directory holding config.json and the weights")
        return Problem("ok", where, f"{path} is a local model")
    cache = hub_cache_of(env)
    if locate_model_dir(source, cache) is not None:
        return Problem("ok", where, f"{source} is in the engine's Hugging Face cache ({cache})")
    token = _hf_token(env)
    offline = env.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    download = (f"download it first: HF_HOME={cache.parent} huggingface-cli download {source}"
                + ("" if token else " (with HF_TOKEN for a gated model)"))
    if offline:
        return Problem("error", where, f"{source} is not in the cache at {cache} and the "
                       "engine is offline (HF_HUB_OFFLINE)", download)
    answer = _ask_hub(source, token, env.get("HF_ENDPOINT") or "https://huggingface.co",
                      hf_timeout)
    if answer == "ok":
        return Problem("ok", where, f"{source} exists on the Hub; the engine downloads it at "
                       f"its first start into {cache} (minutes for large models)")
    if answer == "missing":
        return Problem("error", where, f"{source} is not a model on the Hugging Face Hub",
                       "check the spelling (ORG/NAME, as in the model's URL)")
    if answer == "gated":
        return Problem("error", where, f"{source} is gated or private and "
                       + ("the token was refused" if token else "no HF_TOKEN is set"),
                       "accept the model's licence on huggingface.co, then put HF_TOKEN in "
                       f"[models.{name}] env (or HF_HOME/token)")
    return Problem("error", where, f"{source} is not in the cache at {cache} and "
                   f"huggingface.co cannot be reached ({answer})", download)


def _hf_token(env: Mapping[str, str]) -> str | None:
    if env.get("HF_TOKEN"):
        return env["HF_TOKEN"]
    home = Path(env.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    with contextlib.suppress(OSError):
        return (home / "token").read_text().strip() or None
    return None


def _ask_hub(source: str, token: str | None, endpoint: str, timeout: float) -> str:
    req = urllib.request.Request(f"{endpoint.rstrip('/')}/api/models/{source}", method="GET")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = json.loads(resp.read() or b"{}")
        if data.get("gated") and not token:
            return "gated"
        return "ok"
    except urllib.error.HTTPError as exc:
        return {401: "gated", 403: "gated", 404: "missing"}.get(exc.code, f"HTTP {exc.code}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return str(getattr(exc, "reason", exc))


# --- GPUs, ports, directories --------------------------------------------------------------


def _gpus(cfg: GpudConfig) -> list[Problem]:
    wanted: dict[int, str] = {}
    for name, m in cfg.models.items():
        for g in ([m.gpu] if m.gpu is not None else []) + list(m.gpus or []):
            wanted.setdefault(g, f"models.{name}.gpu{'s' if m.gpus else ''}")
    out = []
    if wanted and not Path("/dev/nvidia-uvm").exists():
        out.append(Problem("error", next(iter(wanted.values())),
                           "/dev/nvidia-uvm is missing: CUDA cannot start",
                           "load the driver's uvm module (modprobe nvidia-uvm, or run "
                           "nvidia-smi once as root); in a container, pass the device"))
    for g, where in sorted(wanted.items()):
        if not Path(f"/dev/nvidia{g}").exists():
            out.append(Problem("error", where, f"GPU {g} is not visible (no /dev/nvidia{g})",
                               "check nvidia-smi; the unit's DeviceAllow= and a container's "
                               "--gpus must include it"))
        else:
            out.append(Problem("ok", where, f"GPU {g} is visible"))
    return out


def _port_taken(host: str, port: int) -> str | None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "in use"
            if exc.errno == errno.EACCES:
                return "needs root (below 1024)"
            return exc.strerror or str(exc)
    return None


def _is_gpud(host: str, port: int) -> bool:
    shown = f"[{host}]" if ":" in host else host
    try:
        with urllib.request.urlopen(f"http://{shown}:{port}/api/v1/status", timeout=2) as r:
            return "daemon" in json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _ports(cfg: GpudConfig) -> list[Problem]:
    out = []
    host, port = cfg.daemon.host, cfg.daemon.port
    bind = "0.0.0.0" if host in ("", "localhost") else host
    taken = _port_taken("127.0.0.1" if host == "localhost" else bind, port)
    if taken and _is_gpud("127.0.0.1" if bind in ("0.0.0.0", "::") else bind, port):
        out.append(Problem("ok", "daemon.listen", f"{cfg.daemon.listen}: gpud listens there"))
    elif taken:
        out.append(Problem("error", "daemon.listen", f"port {port} on {host or '*'} is {taken}"
                           + (" (llama-swap's default is 8080)" if port == 8080 else ""),
                           f"stop what listens there (ss -ltnp 'sport = :{port}') or set "
                           "[daemon] listen to a free port"))
    else:
        out.append(Problem("ok", "daemon.listen", f"{cfg.daemon.listen} is free"))
    for name, m in cfg.models.items():
        if m.port is not None and (why := _port_taken("127.0.0.1", m.port)):
            out.append(Problem("warning", f"models.{name}.port", f"port {m.port} is {why} "
                               "(gpud's own engine for it, if gpud runs, is fine)",
                               "pick another port, or leave port unset (port_range)"))
    lo, hi = cfg.daemon.ports
    need = sum(max(1, m.replicas) for m in cfg.models.values())
    free = 0
    for p in range(lo, hi + 1):
        if _port_taken("127.0.0.1", p) is None:
            free += 1
            if free >= need * 2:
                break
    if free < need:
        out.append(Problem("error", "daemon.port_range", f"{free} free ports in {lo}-{hi}, "
                           f"{need} engines need one each (a move needs one more)",
                           "widen port_range or free ports in it"))
    return out


def _dirs(cfg: GpudConfig) -> list[Problem]:
    out = []
    for key, path in (("daemon.state_dir", cfg.daemon.state_dir),
                      ("daemon.runtime_dir", cfg.daemon.runtime_dir)):
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not os.access(probe, os.W_OK):
            out.append(Problem("warning", key, f"{path} is not writable by this user "
                               f"({probe} is not)", "run as gpud's user (the unit's "
                               "StateDirectory=/RuntimeDirectory= create them), or change it"))
    return out


def print_problems(problems: list[Problem], colour: bool) -> None:
    errors = [p for p in problems if p.severity == "error"]
    for p in problems:
        state = {"error": "failed", "warning": "starting", "ok": "awake"}[p.severity]
        mark = paint({"error": "FAIL", "warning": "WARN", "ok": "ok  "}[p.severity], state,
                     colour)
        print(f"  {mark}  {p.where}: {p.what}")
        if p.fix and p.severity != "ok":
            print(f"        fix: {p.fix}")
    print(f"box: {len(errors)} problem{'s' * (len(errors) != 1)}" if errors
          else "box: ready")

