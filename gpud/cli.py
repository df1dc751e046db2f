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
from gpud.config import DEFAULT_PATH, ConfigError, LoadedConfig, load_config, zone_of


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
    loaded = _load_or_exit(_config_path(args.file))
    n = len(loaded.config.models)
    files = ", ".join(str(s.path) for s in loaded.sources)
    print(f"{files}: valid ({n} model{'s' * (n != 1)}, revision {loaded.revision})")
    return 0


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
    if args.file is None and not args.observed and not args.at and not args.gpus:
        data = _api("GET", "/api/v1/plan", args)
        _print_plan(data, args.json)
        return 0
    from gpud.desired import Layers, effective
    from gpud.plan import plan

    loaded = _load_or_exit(_config_path(args.file))
    cfg = loaded.config
    zone = zone_of(cfg)
    now = datetime.fromisoformat(args.at) if args.at else datetime.now(zone)
    if now.tzinfo is None:
        print("--at needs an offset, e.g. 2026-03-29T07:59:00+02:00", file=sys.stderr)
        return 2
    now = now.astimezone(zone)
    profile, boundary = None, None
    if cfg.schedule:
        from gpud.schedule import Schedule, ScheduleEntry

        sched = Schedule([ScheduleEntry(e.profile, e.when, e.prewake, e.priority)
                          for e in cfg.schedule], zone)
        profile = sched.active_profile(now)
        boundary = sched.next_boundary(now)
    desired = effective(cfg, Layers(profile=profile), now)
    try:
        observed = _parse_observed(args.observed, desired)
    except (ValueError, OSError, AttributeError) as exc:
        print(f"--observed: not a JSON object of MODEL: STATE ({exc})", file=sys.stderr)
        return 2
    result = plan(desired, observed)
    blocked: dict[str, str] = {}
    notes: dict[str, str] = {}
    if args.gpus:
        try:
            fitted = _fit_file(cfg, result, desired, observed, args.gpus)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            print(f"--gpus: expected {{\"0\": {{\"total\": \"80GiB\", \"free\": \"60GiB\"}}}} "
                  f"({exc})", file=sys.stderr)
            return 2
        result = type(result)(fitted.actions, result.waiting)
        blocked, notes = fitted.blocked, fitted.notes
    out: dict[str, Any] = {
        "profile": profile,
        "desired": {k: d.state for k, d in desired.items()},
        "reasons": {k: d.reason for k, d in desired.items()},
        "actions": [a.to_json() for a in result.actions],
    }
    if args.gpus:
        out["blocked"], out["notes"] = blocked, notes
    if cfg.schedule:
        out["at"] = now.isoformat()
        out["next_boundary"] = (
            {"at": boundary.at.isoformat(), "profile": boundary.profile} if boundary else None
        )
    _print_plan(out, args.json)
    return 0


def _fit_file(cfg: Any, result: Any, desired: Any, observed: Any, text: str) -> Any:
    """Fit checks for `gpud plan --file`: GPU memory given as JSON, footprints estimated."""
    from gpud.config.units import parse_size
    from gpud.fit import GpuMemory, fit, footprint_for, locate_model_dir

    raw = json.loads(text)
    gpus = {}
    for index, g in raw.items():
        total = parse_size(g["total"])
        free = parse_size(g.get("free", g["total"]))
        gpus[int(index)] = GpuMemory(total, total - free, free)
    fps = {}
    for key, d in desired.items():
        if d.gpu is None:
            continue
        m = cfg.models[d.model]
        fp = footprint_for(m, locate_model_dir(m.source),
                           gpus[d.gpu].total if d.gpu in gpus else None)
        if fp is not None:
            fps[key] = fp
    busy = {k for k, o in observed.items() if o.busy}
    return fit(result, desired, observed, gpus, fps, cfg.daemon.gpu_headroom, busy)


def _print_plan(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
        return
    if "at" in data:
        print(f"at {data['at']}: profile {data['profile'] or '(none)'}")
        nb = data.get("next_boundary")
        if nb:
            print(f"next switch: {nb['at']} -> profile {nb['profile'] or '(none)'}")
    elif data.get("profile"):
        print(f"profile {data['profile']}")
    reasons = data.get("reasons", {})
    for model, state in data.get("desired", {}).items():
        why = reasons.get(model, "")
        print(f"  {model:<20} {state:<9} {why}")
    if not data["actions"]:
        print("nothing to do")
    for i, a in enumerate(data["actions"], 1):
        print(f"{i:>3}. {a['action']:<8} {a['model']:<20} {a['reason']}")
    for model, why in sorted(data.get("blocked", {}).items()):
        print(f"  does not fit: {model}: {why}")


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


def _admin_token() -> str | None:
    path = os.environ.get("GPUD_ADMIN_TOKEN_FILE")
    if path and Path(path).is_file():
        return Path(path).read_text().strip()
    return os.environ.get("GPUD_ADMIN_TOKEN")


def request(method: str, path: str, args: argparse.Namespace, body: Any = None,
            timeout: float = 30.0) -> tuple[int, Any] | None:
    """(status, JSON body) from the daemon, or None when no daemon answers."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(_base_url(args) + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    token = _admin_token()
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
    cfg = data["config"]
    valid = "valid" if cfg["valid"] else f"INVALID: {cfg['error']}"
    if cfg.get("fallback"):
        valid = f"LAST GOOD (the file is invalid): {cfg['error']}"
    print(f"gpud {data['daemon']['version']} pid {data['daemon']['pid']} · "
          f"profile {data.get('profile') or '(none)'} · config {cfg['revision']} {valid}")
    if data["daemon"].get("listen_problem"):
        print(f"listen: {data['daemon']['listen_problem']}")
    rows = [("MODEL", "STATE", "DESIRED", "GPU", "MEMORY", "IN-FLIGHT", "REASON")]
    for name, m in data["models"].items():
        mem = m.get("memory_bytes")
        rows.append((
            name, m["state"], m["desired"], "-" if m["gpu"] is None else str(m["gpu"]),
            "-" if not mem else f"{mem / 2**30:.1f}GiB",
            f"{m.get('inflight', 0)}/{m.get('queued', 0)}", m["reason"],
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:6], widths, strict=False)) + "  " + r[6])
    return 0


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
    if data.get("valid"):
        changed = "changed" if data.get("changed") else "unchanged"
        print(f"config {data['revision']} active ({changed})")
        return 0
    print(f"gpud: reload refused, still running {data.get('revision')}:\n{data.get('error')}",
          file=sys.stderr)
    return 1


def cmd_model_action(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.for_:
        body["for"] = args.for_
    if getattr(args, "level", None):
        body["level"] = args.level
    data = _api("POST", f"/api/v1/models/{args.model}/{args.verb}", args, body)
    print(data.get("message", "ok"))
    return 0


def cmd_auto(args: argparse.Namespace) -> int:
    print(_api("DELETE", f"/api/v1/models/{args.model}/override", args).get("message", "ok"))
    return 0


def cmd_move(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"gpu": args.gpu}
    if args.for_:
        body["for"] = args.for_
    print(_api("POST", f"/api/v1/models/{args.model}/move", args, body).get("message", "ok"))
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpud", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"gpud {__version__}")
    p.add_argument("--url", help="the daemon's base URL (default: from the config's listen)")
    p.add_argument("--config", help="config file (default /etc/gpud/gpud.toml or GPUD_CONFIG)")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    s = sub.add_parser("run", help="run the daemon in the foreground")
    s.add_argument("--config", default=argparse.SUPPRESS,
                   help="config file (default /etc/gpud/gpud.toml or GPUD_CONFIG)")
    s.add_argument("--stop-engines-on-exit", action=argparse.BooleanOptionalAction, default=None,
                   help="stop engines on a clean stop (default yes; a crash never stops them)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("check", help="validate a config file (exit 0 valid, 1 invalid)")
    s.add_argument("file", nargs="?")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("plan", help="what the daemon would do (dry run)")
    s.add_argument("--file", help="plan from this file without a daemon")
    s.add_argument("--observed", help="observed state as JSON (or @FILE): {MODEL: STATE, ...}")
    s.add_argument("--at", help="evaluate the schedule at this ISO 8601 instant with offset")
    s.add_argument("--gpus", help='check fit against GPU memory: {"0": {"total": "80GiB", '
                   '"free": "60GiB"}}')
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("status", help="what the box is doing and why")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("reload", help="reload the config file")
    s.add_argument("--wait", action="store_true", help="return once the new config is active")
    s.set_defaults(func=cmd_reload)

    for verb in ("sleep", "wake", "load", "unload"):
        s = sub.add_parser(verb, help=f"{verb} a model (a manual override)")
        s.add_argument("model")
        s.add_argument("--for", dest="for_", help="expire the override after this duration")
        if verb == "sleep":
            s.add_argument("--level", type=int, choices=(1, 2))
        s.set_defaults(func=cmd_model_action, verb=verb)

    s = sub.add_parser("auto", help="drop a model's manual override (back to file/schedule)")
    s.add_argument("model")
    s.set_defaults(func=cmd_auto)

    s = sub.add_parser("move", help="move a model to another GPU without downtime")
    s.add_argument("model")
    s.add_argument("--gpu", type=int, required=True)
    s.add_argument("--for", dest="for_", help="expire the override after this duration")
    s.set_defaults(func=cmd_move)

    s = sub.add_parser("profile", help="show or force the active profile")
    s.add_argument("name", nargs="?")
    s.add_argument("--for", dest="for_", help="expire the forced profile after this duration")
    s.add_argument("--auto", action="store_true", help="return to the schedule")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_profile)

    s = sub.add_parser("demo", help="run the daemon with two tiny real models")
    s.add_argument("--dir", help="state directory for the demo (default .state/demo)")
    s.add_argument("--listen", default="127.0.0.1:8080")
    s.set_defaults(func=cmd_demo)
    # Verbs that live in their own modules register themselves here.
    for module in ("gpud.cli_extra", "gpud.bench"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ImportError:
            continue
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

