"""`gpud`: one command, many verbs. The daemon is `gpud run`; the rest talk to its API.

`check` and `plan --file` work without a daemon. Output is for people by default and one JSON
object with `--json`. Exit codes: 0 success, 1 refused or invalid, 2 usage or cannot connect.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from gpud import __version__
from gpud.cli_fmt import colour_wanted, flags_text, paint, phases_text, state_text, table
from gpud.config import DEFAULT_PATH, ConfigError, LoadedConfig, load_config, zone_of
from gpud.states import State


def _config_path(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    env = os.environ.get("GPUD_CONFIG")
    return Path(env) if env else None


def _load_or_exit(path: Path | None) -> LoadedConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        for err in exc.errors:
            print(err, file=sys.stderr)
        raise SystemExit(1) from None


def cmd_check(args: argparse.Namespace) -> int:
    path = _config_path(args.file)
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        if args.json:
            print(json.dumps({"valid": False, "errors": [str(e) for e in exc.errors]},
                             indent=2))
        else:
            for err in exc.errors:
                print(err, file=sys.stderr)
        return 1
    n = len(loaded.config.models)
    files = [str(s.path) for s in loaded.sources]
    problems: list[Any] = []
    if args.box:
        from gpud.box import check_box

        problems = check_box(loaded.config)
    if args.json:
        out: dict[str, Any] = {"valid": True, "files": files, "models": n,
                               "revision": loaded.revision}
        if args.box:
            out["box"] = [p.to_json() for p in problems]
        print(json.dumps(out, indent=2))
    else:
        print(f"{', '.join(files)}: valid ({n} model{'s' * (n != 1)}, revision "
              f"{loaded.revision})")
        if args.box:
            from gpud.box import print_problems

            print_problems(problems, colour_wanted(sys.stdout))
    return 1 if any(p.severity == "error" for p in problems) else 0


def _parse_observed(text: str | None, desired: dict[str, Any]) -> dict[str, Any]:
    from gpud.plan import ObservedModel

    if not text:
        return {}
    raw = json.loads(Path(text[1:]).read_text() if text.startswith("@") else text)
    out = {}
    for key, value in raw.items():
        if isinstance(value, str):
            d = desired.get(key)
            value = {"state": value, "spec_hash": d.spec_hash if d else None,
                     "gpu": d.gpu if d else None}
        out[key] = ObservedModel(
            state=value.get("state", "unloaded"), spec_hash=value.get("spec_hash"),
            gpu=value.get("gpu"), busy=bool(value.get("busy", False)),
        )
    return out


def cmd_plan(args: argparse.Namespace) -> int:
    local = (args.file, args.observed, args.at, args.gpus, args.override, args.intent)
    if not any(local):
        _print_plan(_api("GET", "/api/v1/plan", args), args.json)
        return 0
    from gpud.decide import decide
    from gpud.desired import LayerInputs
    from gpud.schedule import parse_at, schedule_of

    loaded = _load_or_exit(_config_path(args.file))
    cfg = loaded.config
    zone = zone_of(cfg)
    try:
        now = parse_at(args.at, datetime.now(zone)) if args.at else datetime.now(zone)
        inputs = LayerInputs(overrides=_plan_overrides(cfg, args.override),
                             intents=_plan_intents(cfg, args.intent))
        memory = _plan_memory(cfg, args.gpus) if args.gpus else None
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    schedule = schedule_of(cfg.schedule, zone)
    base = decide(cfg, schedule, inputs, {}, now, 0.0)  # the desired state names the specs
    try:
        observed = _parse_observed(args.observed, dict(base.desired))
    except (ValueError, OSError, AttributeError) as exc:
        print(f"--observed: not a JSON object of MODEL: STATE ({exc})", file=sys.stderr)
        return 2
    decision = decide(cfg, schedule, inputs, observed, now, 0.0, memory)
    _print_plan(decision.to_json(), args.json)
    return 0


PLAN_VERBS = {State.ASLEEP.value: "sleep", State.AWAKE.value: "wake",
              State.UNLOADED.value: "unload"}


def _plan_pairs(cfg: Any, items: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        model, sep, state = item.partition("=")
        if not sep or state not in PLAN_VERBS:
            raise ValueError(f"{flag} {item!r}: expected MODEL=awake|asleep|unloaded")
        if model not in cfg.models:
            known = ", ".join(cfg.models) or "none"
            raise ValueError(f"{flag} {item!r}: no model {model!r} (known: {known})")
        out[model] = state
    return out


def _plan_overrides(cfg: Any, items: list[str] | None) -> dict[str, Any]:
    """`--override chat=asleep`: as if an operator ran `gpud sleep chat` (the API's words)."""
    from gpud.desired import Override

    return {m: Override(state=st, reason=f"{PLAN_VERBS[st]} by an operator")
            for m, st in _plan_pairs(cfg, items, "--override").items()}


def _plan_intents(cfg: Any, items: list[str] | None) -> dict[str, Any]:
    """`--intent chat=awake`: as if a policy named `--intent` asked for it."""
    from gpud.desired import Intent

    return {m: Intent(st, "asked in the dry run", policy="--intent")
            for m, st in _plan_pairs(cfg, items, "--intent").items()}


def _plan_memory(cfg: Any, text: str) -> Any:
    """`--gpus`: GPU memory given as JSON; footprints estimated as the daemon does."""
    from gpud.config.units import parse_size
    from gpud.decide import Memory
    from gpud.fit import GpuMemory
    from gpud.footprints import estimate_for

    try:
        gpus = {}
        for index, g in json.loads(text).items():
            total = parse_size(g["total"])
            free = parse_size(g.get("free", g["total"]))
            gpus[int(index)] = GpuMemory(total, total - free, free)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"--gpus: expected {{\"0\": {{\"total\": \"80GiB\", \"free\": "
                         f"\"60GiB\"}}}} ({exc})") from None

    def footprints(desired: Any) -> dict[str, Any]:
        fps = {}
        for key, d in desired.items():
            if d.gpu is not None:
                fp = estimate_for(cfg, d.model, gpus[d.gpu].total if d.gpu in gpus else None)
                if fp is not None:
                    fps[key] = fp
        return fps

    return Memory(gpus, footprints)


def _print_plan(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
        return
    from gpud.decide import FIT_NOT_CHECKED

    print(f"at {data.get('at', '?')}: profile {data.get('profile') or '(none)'}"
          + (f" ({data['profile_source']})" if data.get("profile_source") not in
             (None, "schedule", "no schedule") else ""))
    nb = data.get("next_boundary")
    if nb:
        pre = nb.get("prewake_seconds") or 0
        print(f"next switch: {nb['at']} -> profile {nb['profile'] or '(none)'}"
              + (f" (pre-wake {pre:g}s before)" if pre else ""))
    reasons = data.get("reasons", {})
    for model, state in data.get("desired", {}).items():
        print(f"  {model:<20} {state:<9} {reasons.get(model, '')}")
    for model, why in sorted(data.get("prewake", {}).items()):
        print(f"  pre-wake: {model}: {why}")
    if not data["actions"]:
        print("nothing to do")
    for i, a in enumerate(data["actions"], 1):
        print(f"{i:>3}. {a['action']:<8} {a['model']:<20} {a['reason']}")
    for model, why in sorted(data.get("blocked", {}).items()):
        print(f"  does not fit: {model}: {why}")
    for model, why in sorted(data.get("notes", {}).items()):
        print(f"  fit: {model}: {why}")
    if data.get("fit_checked") is False:
        print(f"  {FIT_NOT_CHECKED}")


# --- talking to the daemon ---------------------------------------------------------------


def _base_url(args: argparse.Namespace) -> str:
    url = getattr(args, "url", None) or os.environ.get("GPUD_URL")
    if url:
        return url.rstrip("/")
    try:
        cfg = load_config(_config_path(getattr(args, "config", None))).config
        host, port = cfg.daemon.host, cfg.daemon.port
    except ConfigError:
        # The file is being edited and invalid right now (`reload --wait` after a bad edit):
        # the daemon still listens where the file's listen line says, valid or not.
        host, port = "127.0.0.1", 8080
        path = _config_path(getattr(args, "config", None)) or DEFAULT_PATH
        with contextlib.suppress(OSError):
            found = re.search(r'^\s*listen\s*=\s*"([^"]+):(\d+)"', path.read_text(), re.M)
            if found:
                host, port = found.group(1).strip("[]"), int(found.group(2))
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _admin_token(args: argparse.Namespace | None = None) -> str | None:
    """The admin token for a daemon that is not on loopback: --token-file, else
    GPUD_ADMIN_TOKEN_FILE, else GPUD_ADMIN_TOKEN (see `gpud --help`)."""
    path = getattr(args, "token_file", None) or os.environ.get("GPUD_ADMIN_TOKEN_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            print(f"gpud: cannot read the admin token file {path}: {exc.strerror or exc}",
                  file=sys.stderr)
            raise SystemExit(2) from None
    return os.environ.get("GPUD_ADMIN_TOKEN") or None


def request(method: str, path: str, args: argparse.Namespace, body: Any = None,
            timeout: float = 30.0) -> tuple[int, Any] | None:
    """(status, JSON body) from the daemon, or None when no daemon answers."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(_base_url(args) + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    token = _admin_token(args)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _api(method: str, path: str, args: argparse.Namespace, body: Any = None,
         timeout: float = 30.0, ok_codes: tuple[int, ...] = ()) -> Any:
    """The daemon's JSON answer; exits 1 on an error answer, 2 when no daemon answers."""
    answer = request(method, path, args, body, timeout)
    if answer is None:
        print(f"gpud: cannot reach the daemon at {_base_url(args)}\n"
              "  is it running? (systemctl status gpud)", file=sys.stderr)
        raise SystemExit(2)
    code, detail = answer
    if code < 400 or code in ok_codes:
        return detail
    err = detail.get("error") if isinstance(detail, dict) else None
    msg = err.get("message") if isinstance(err, dict) else err
    print(f"gpud: {msg or 'request refused'} (HTTP {code})", file=sys.stderr)
    raise SystemExit(1)


def cmd_status(args: argparse.Namespace) -> int:
    data = _api("GET", "/api/v1/status", args)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for line in status_lines(data, colour_wanted(sys.stdout)):
        print(line)
    return 0


def status_lines(data: dict[str, Any], colour: bool = False) -> list[str]:
    """`gpud status` for people: the daemon's line, then a row per model."""
    cfg = data["config"]
    valid = "valid" if cfg["valid"] else f"INVALID: {cfg['error']}"
    if cfg.get("fallback"):
        valid = f"LAST GOOD (the file is invalid): {cfg['error']}"
    out = [f"gpud {data['daemon']['version']} pid {data['daemon']['pid']} · "
           f"profile {data.get('profile') or '(none)'} · config {cfg['revision']} {valid}"]
    if data["daemon"].get("listen_problem"):
        out.append(f"listen: {data['daemon']['listen_problem']}")
    rows = [["MODEL", "STATE", "DESIRED", "GPU", "PORT", "MEMORY", "IN-FLIGHT", "FLAGS",
             "REASON"]]
    for name, m in data["models"].items():
        mem = m.get("memory_bytes")
        rows.append([
            name, paint(state_text(m), m["state"], colour), m["desired"],
            "-" if m["gpu"] is None else str(m["gpu"]),
            str(m["port"]) if m.get("port") else "-",
            "-" if not mem else f"{mem / 2**30:.1f}GiB",
            f"{m.get('inflight', 0)}/{m.get('queued', 0)}", flags_text(m), m["reason"],
        ])
    out += table(rows)
    for name, m in data["models"].items():
        if m.get("phase"):
            out.append(f"  {name} load: {phases_text(m)}")
        if m.get("log_line"):
            out.append(f"  {name} log: {m['log_line']}")
    return out


def reload_daemon(args: argparse.Namespace) -> tuple[int, dict[str, Any]] | None:
    """Ask the daemon to reload and wait for the verdict: (HTTP status, answer), or None when
    no daemon answers. 200 with valid=true: the new file is active; 422: refused, the old
    one keeps running."""
    answer = request("POST", "/api/v1/reload", args, {}, timeout=120)
    if answer is None:
        return None
    status, data = answer
    return status, data if isinstance(data, dict) else {}


def cmd_reload(args: argparse.Namespace) -> int:
    answer = reload_daemon(args)
    if answer is None:
        print(f"gpud: cannot reach the daemon at {_base_url(args)}\n"
              "  is it running? (systemctl status gpud)", file=sys.stderr)
        return 2
    status, data = answer
    if status not in (200, 422):
        err = data.get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        print(f"gpud: {msg or 'reload refused'} (HTTP {status})", file=sys.stderr)
        return 1
    if args.json and not args.wait:
        print(json.dumps(data, indent=2))
        return 0 if data.get("valid") else 1
    if data.get("valid"):
        changed = "changed" if data.get("changed") else "unchanged"
        if not args.json:
            print(f"config {data['revision']} active ({changed})")
        return _then_wait(args, None, data)
    if args.json:
        print(json.dumps(data, indent=2))
    print(f"gpud: reload refused, still running {data.get('revision')}:\n{data.get('error')}",
          file=sys.stderr)
    return 1


def _then_wait(args: argparse.Namespace, names: set[str] | None, answer: Any) -> int:
    """After a command: with --wait, until the box matches or a model failed."""
    if not getattr(args, "wait", False):
        return 0
    from gpud.cli_wait import wait_for_box

    if args.json:
        with open(os.devnull, "w") as quiet:
            code = wait_for_box(args, names, args.timeout, out=quiet)
        models = _api("GET", "/api/v1/status", args)["models"]
        print(json.dumps({"answer": answer, "matched": code == 0,
                          "models": {k: m for k, m in models.items()
                                     if not names or m["model"] in names}}, indent=2))
        return code
    return wait_for_box(args, names, args.timeout)


def cmd_model_action(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.for_:
        body["for"] = args.for_
    if getattr(args, "level", None):
        body["level"] = args.level
    data = _api("POST", f"/api/v1/models/{args.model}/{args.verb}", args, body)
    if args.json and not args.wait:
        print(json.dumps(data, indent=2))
        return 0
    if not args.json:
        print(data.get("message", "ok"))
    return _then_wait(args, {args.model}, data)


def cmd_auto(args: argparse.Namespace) -> int:
    data = _api("DELETE", f"/api/v1/models/{args.model}/override", args)
    print(json.dumps(data, indent=2) if args.json else data.get("message", "ok"))
    return 0


def cmd_move(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"gpu": args.gpu}
    if args.for_:
        body["for"] = args.for_
    data = _api("POST", f"/api/v1/models/{args.model}/move", args, body)
    if args.json and not args.wait:
        print(json.dumps(data, indent=2))
        return 0
    if not args.json:
        print(data.get("message", "ok"))
    return _then_wait(args, {args.model}, data)


def cmd_profile(args: argparse.Namespace) -> int:
    if args.auto:
        data = _api("DELETE", "/api/v1/profile", args)
    elif args.name:
        body: dict[str, Any] = {"profile": args.name}
        if args.for_:
            body["for"] = args.for_
        data = _api("PUT", "/api/v1/profile", args, body)
    else:
        data = _api("GET", "/api/v1/profile", args)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        forced = data.get("forced")
        line = f"profile {data.get('profile') or '(none)'}"
        if forced:
            line += f" (forced{' until ' + forced['until'] if forced.get('until') else ''})"
        nb = data.get("next_boundary")
        if nb:
            line += f"; next switch {nb['at']} -> {nb['profile']}"
        print(line)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from gpud.daemon import run_daemon

    return run_daemon(_config_path(args.config), stop_engines_on_exit=args.stop_engines_on_exit)


def cmd_demo(args: argparse.Namespace) -> int:
    from gpud.demo import run_demo

    return run_demo(Path(args.dir) if args.dir else None, listen=args.listen)


ENVIRONMENT = """\
environment:
  GPUD_CONFIG            config file (as --config)
  GPUD_URL               the daemon's base URL (as --url)
  GPUD_ADMIN_TOKEN_FILE  a file holding the admin token (as --token-file)
  GPUD_ADMIN_TOKEN       the admin token itself
  NO_COLOR               set (to anything): no colour even on a terminal

A daemon on another machine takes writes (sleep, wake, load, reload, set...) only with its
admin token, the one in the file its [auth] admin_token_file names: pass the same token
with --token-file or GPUD_ADMIN_TOKEN_FILE (or GPUD_ADMIN_TOKEN). On loopback no token is
needed. Exit codes: 0 done, 1 refused or invalid, 2 usage or no daemon, 3 --wait timed out.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpud", description=__doc__.split("\n")[0],
                                epilog=ENVIRONMENT,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"gpud {__version__}")
    p.add_argument("--url", help="the daemon's base URL (default: GPUD_URL, else the "
                   "config's listen)")
    p.add_argument("--config", help="config file (default /etc/gpud/gpud.toml or GPUD_CONFIG)")
    p.add_argument("--token-file", metavar="FILE",
                   help="the admin token for a remote daemon's writes (default: "
                   "GPUD_ADMIN_TOKEN_FILE, else GPUD_ADMIN_TOKEN)")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    _local_verbs(sub)
    _daemon_verbs(sub)
    # Verbs that live in their own modules register themselves; a broken one fails loudly.
    from gpud import bench, cli_activity, cli_extra

    cli_extra.register(sub)
    cli_activity.register(sub)
    bench.register(sub)
    return p


def _local_verbs(sub: Any) -> None:
    """Verbs that work without a daemon: run it, check a file, plan a dry run, the demo."""
    s = sub.add_parser("run", help="run the daemon in the foreground")
    s.add_argument("--config", default=argparse.SUPPRESS,
                   help="config file (default /etc/gpud/gpud.toml or GPUD_CONFIG)")
    s.add_argument("--stop-engines-on-exit", action=argparse.BooleanOptionalAction, default=None,
                   help="stop engines on a clean stop (default yes; a crash never stops them)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("check", help="validate a config file (exit 0 valid, 1 invalid); "
                       "with --box, also this machine")
    s.add_argument("file", nargs="?", help="the file (default: --config, GPUD_CONFIG, else "
                   "/etc/gpud/gpud.toml)")
    s.add_argument("--box", action="store_true",
                   help="also check that this machine can run the file: each engine command "
                   "runs, local sources exist, HF ids resolve (cache or token), GPUs and "
                   "ports; each problem with its fix (exit 1 on an error)")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("plan", help="what the daemon would do (dry run)")
    s.add_argument("--file", help="plan from this file without a daemon")
    s.add_argument("--observed", help="observed state as JSON (or @FILE): {MODEL: STATE, ...}")
    s.add_argument("--at", help="plan for this instant on the schedule's clock: 10:00, "
                   "tomorrow 07:55, fri 19:30, or ISO 8601 (with or without an offset)")
    s.add_argument("--override", action="append", metavar="MODEL=STATE",
                   help="as if an operator set MODEL awake|asleep|unloaded (repeatable)")
    s.add_argument("--intent", action="append", metavar="MODEL=STATE",
                   help="as if a policy asked for MODEL awake|asleep|unloaded (repeatable)")
    s.add_argument("--gpus", help='check fit against GPU memory: {"0": {"total": "80GiB", '
                   '"free": "60GiB"}}')
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("demo", help="run the daemon with two tiny real models")
    s.add_argument("--dir", help="state directory for the demo (default .state/demo)")
    s.add_argument("--listen", default="127.0.0.1:8080",
                   help="where the demo serves (default 127.0.0.1:8080)")
    s.set_defaults(func=cmd_demo)


JSON_HELP = "print the answer as one JSON object (for scripts)"
WAIT_FOR = {"sleep": "the model is asleep", "wake": "the model is awake",
            "load": "the model is loaded (awake)", "unload":
            "the model is unloaded"}


def _wait_options(s: argparse.ArgumentParser, what: str) -> None:
    s.add_argument("--wait", action="store_true",
                   help=f"return once {what} (exit 0), or once a model failed (exit 1, saying "
                   "which and why); shows the load's phases as it goes")
    s.add_argument("--timeout", type=_seconds, metavar="DURATION",
                   help="with --wait: give up after this long (exit 3), e.g. 20m")
    s.add_argument("--json", action="store_true", help=JSON_HELP)


def _seconds(text: str) -> float:
    from gpud.config.units import parse_duration

    try:
        return parse_duration(text).total_seconds()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _daemon_verbs(sub: Any) -> None:
    """Verbs that talk to a running daemon's API."""
    s = sub.add_parser("status", help="what the box is doing and why")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("reload", help="reload the config file")
    _wait_options(s, "the box matches the new config")
    s.set_defaults(func=cmd_reload)

    for verb in ("sleep", "wake", "load", "unload"):
        s = sub.add_parser(verb, help=f"{verb} a model (a manual override)")
        s.add_argument("model", help="the model's name (its [models.NAME] table)")
        s.add_argument("--for", dest="for_", metavar="DURATION",
                       help="expire the override after this duration (e.g. 2h)")
        if verb == "sleep":
            s.add_argument("--level", type=int, choices=(1, 2),
                           help="1: weights to host memory (fast wake); 2: weights dropped")
        _wait_options(s, WAIT_FOR[verb])
        s.set_defaults(func=cmd_model_action, verb=verb)

    s = sub.add_parser("auto", help="drop a model's manual override (back to file/schedule)")
    s.add_argument("model", help="the model's name")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(func=cmd_auto)

    s = sub.add_parser("move", help="move a model to another GPU without downtime")
    s.add_argument("model", help="the model's name")
    s.add_argument("--gpu", type=int, required=True, help="the GPU index to move it to")
    s.add_argument("--for", dest="for_", metavar="DURATION",
                   help="expire the override after this duration")
    _wait_options(s, "the model serves from the new GPU")
    s.set_defaults(func=cmd_move)

    s = sub.add_parser("profile", help="show or force the active profile")
    s.add_argument("name", nargs="?", help="the profile to force (omit to show the active one)")
    s.add_argument("--for", dest="for_", metavar="DURATION",
                   help="expire the forced profile after this duration")
    s.add_argument("--auto", action="store_true", help="return to the schedule")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(func=cmd_profile)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

