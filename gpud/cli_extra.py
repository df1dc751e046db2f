"""More `gpud` verbs: `set`/`unset` (edit the config file), `logs MODEL`, `events`.

`set` and `unset` work without a daemon: they edit, validate and write the file, then ask a
running daemon to reload (and say so when none answers; the file is written either way).
`logs` and `events` read the daemon's API. Registered by `gpud.cli.build_parser`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from gpud.cli import _admin_token, _api, _base_url, _config_path, reload_daemon, request
from gpud.config import ConfigError
from gpud.config.load import DEFAULT_PATH


def _request(method: str, path: str, args: argparse.Namespace, *, timeout: float = 10.0,
             body: Any = None) -> tuple[int, Any] | None:
    """(status, JSON) from the daemon, or None when no daemon answers."""
    return request(method, path, args, body, timeout)


def _error_message(data: Any) -> str:
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    return "unknown error"


# --- set / unset ---------------------------------------------------------------------------


def _target_file(args: argparse.Namespace) -> Path:
    """--file, else --config / GPUD_CONFIG, else the file the running daemon reads, else
    /etc/gpud/gpud.toml."""
    if args.file:
        return Path(args.file)
    configured = _config_path(getattr(args, "config", None))
    if configured is not None:
        return configured
    answer = _request("GET", "/api/v1/config", args, timeout=2.0)
    if answer and answer[0] == 200 and isinstance(answer[1], dict) \
            and not answer[1].get("embedded") and answer[1].get("path"):
        return Path(answer[1]["path"])
    return DEFAULT_PATH


def cmd_set(args: argparse.Namespace) -> int:
    if not args.json:
        return _set(args, {})
    report: dict[str, Any] = {}
    with contextlib.redirect_stdout(io.StringIO()) as said:
        code = _set(args, report)
    report["messages"] = [ln for ln in said.getvalue().splitlines()
                          if ln and not ln.startswith(("---", "+++", "@@", "+", "-", " "))]
    print(json.dumps({"ok": code == 0, **report}, indent=2))
    return code


def _set(args: argparse.Namespace, report: dict[str, Any]) -> int:
    from gpud.config.edit import EditError, edit_file, parse_value

    path = _target_file(args)
    report.update(path=str(path), key=args.key, changed=False, written=False)
    if not getattr(args, "config", None):
        args.config = str(path)  # the daemon to reload listens where this file says
    unset = args.verb == "unset"
    try:
        result = edit_file(path, args.key, None if unset else parse_value(args.value),
                           unset=unset, dry_run=args.dry_run)
    except EditError as exc:
        print(f"gpud: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"gpud: refused, {path} is unchanged; the result would be invalid:",
              file=sys.stderr)
        for err in exc.errors:
            print(f"  {err}", file=sys.stderr)
        return 1
    if not result.changed:
        print(f"{path}: {args.key} already has that value; nothing to do")
        return 0
    report.update(changed=True, diff=result.diff())
    sys.stdout.write(result.diff())
    for warning in result.warnings:
        print(f"gpud: warning: {warning}", file=sys.stderr)
    if args.dry_run:
        print("(dry run: the file is unchanged)")
        return 0
    print(f"{path}: written (valid)")
    report["written"] = True
    if args.no_reload:
        return 0
    return _reload_after_edit(path, args)


def _reload_after_edit(path: Path, args: argparse.Namespace) -> int:
    answer = _request("GET", "/api/v1/config", args, timeout=5.0)
    if answer is None:
        print(f"no daemon answered at {_base_url(args)}; the file is written and is read "
              "when gpud starts (or: systemctl reload gpud)")
        return 0
    status, data = answer
    running = Path(str(data.get("path"))) if status == 200 and isinstance(data, dict) else None
    if running is not None and running.resolve() != path.resolve():
        print(f"the daemon at {_base_url(args)} runs {running}, not {path}: not reloading it")
        return 0
    answer = reload_daemon(args)
    if answer is None:
        print(f"no daemon answered at {_base_url(args)}; the file is written")
        return 0
    status, data = answer
    if status == 200 and isinstance(data, dict) and data.get("valid"):
        state = "changed" if data.get("changed") else "unchanged"
        print(f"reloaded: revision {data.get('revision')} active ({state})")
        return 0
    print(f"gpud: the daemon refused the reload (HTTP {status}): {_error_message(data)}",
          file=sys.stderr)
    return 1


# --- logs ------------------------------------------------------------------------------------


def new_lines(previous: list[str], current: list[str]) -> list[str]:
    """The lines of CURRENT after what PREVIOUS already showed (both are tails of one log)."""
    if not previous:
        return current
    for k in range(min(len(previous), len(current)), 0, -1):
        if previous[-k:] == current[:k]:
            return current[k:]
    return current  # no overlap: the log moved on by more than a window (or was rotated)


def cmd_logs(args: argparse.Namespace) -> int:
    if not 0 < args.lines <= 2000:
        print("gpud: -n must be between 1 and 2000", file=sys.stderr)
        return 2
    path = f"/api/v1/models/{urllib.parse.quote(args.model, safe='')}/logs"
    data = _api("GET", f"{path}?lines={args.lines}", args)
    shown: list[str] = list(data.get("lines", []))
    if args.json and not args.follow:
        print(json.dumps(data, indent=2))
        return 0
    for line in shown:
        print(json.dumps({"model": args.model, "line": line}) if args.json else line)
    if not args.follow:
        return 0
    window = 2000
    sys.stdout.flush()
    while True:
        time.sleep(args.interval)
        data = _api("GET", f"{path}?lines={window}", args)
        current = list(data.get("lines", []))
        for line in new_lines(shown, current):
            print(json.dumps({"model": args.model, "line": line}) if args.json else line)
        sys.stdout.flush()
        shown = current


# --- events ------------------------------------------------------------------------------------


def _print_event(event: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(event))
        return
    from gpud.web.page import describe_event

    at = datetime.fromtimestamp(float(event.get("time", 0))).strftime("%H:%M:%S")
    model = event.get("model") or ""
    print(f"{at}  {event.get('kind', ''):<14} {model:<16} {describe_event(event)}".rstrip())


def _stream(args: argparse.Namespace, since: int, timeout: float | None) -> Any:
    req = urllib.request.Request(f"{_base_url(args)}/api/v1/events?since={since}")
    req.add_header("Accept", "text/event-stream")
    token = _admin_token(args)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    return urllib.request.urlopen(req, timeout=timeout)


def cmd_events(args: argparse.Namespace) -> int:
    """Recent events (the daemon's history), and with -f the live stream after them."""
    history: list[dict[str, Any]] = []
    last = 0
    # The history comes in one burst: without -f, a read that then waits a second means it
    # is complete. With -f, the daemon's keep-alive comes every 15 s; silence for 45 s means
    # a dead connection, and we reconnect after the last event seen.
    timeout = 45.0 if args.follow else 1.0
    connected_once = False
    while True:
        try:
            with _stream(args, last, timeout) as resp:
                connected_once = True
                for raw in resp:
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    if not line.startswith("data: "):
                        continue
                    try:
                        event = json.loads(line[6:])
                    except ValueError:
                        continue
                    seq = int(event.get("seq", 0))
                    if seq <= last:
                        continue
                    last = seq
                    if args.follow:
                        _print_event(event, args.json)
                        sys.stdout.flush()
                    else:
                        history.append(event)
        except (urllib.error.URLError, OSError) as exc:
            if not connected_once:
                print(f"gpud: cannot reach the daemon at {_base_url(args)}: "
                      f"{getattr(exc, 'reason', exc)}", file=sys.stderr)
                return 2
        if not args.follow:
            for event in history[-args.lines:]:
                _print_event(event, args.json)
            return 0
        time.sleep(1.0)


def register(sub: Any) -> None:
    for verb, text in (("set", "change one key of the config file, keeping its comments "
                                "(validated first; then the daemon reloads)"),
                       ("unset", "remove one key from the config file (its default applies)")):
        s = sub.add_parser(verb, help=text, description=text)
        s.add_argument("--file", help="the file to edit (default: --config, GPUD_CONFIG, the "
                                      "running daemon's file, else /etc/gpud/gpud.toml)")
        s.add_argument("--dry-run", action="store_true", help="show the diff, write nothing")
        s.add_argument("--no-reload", action="store_true", help="do not ask the daemon to reload")
        s.add_argument("--json", action="store_true",
                       help="one JSON object: {path, changed, written, diff, reload}")
        s.add_argument("key", help="dotted key, e.g. models.chat.state or schedule.0.when")
        if verb == "set":
            s.add_argument("value", help="a TOML value (2, true, [\"a\"]) or else a string "
                                         "(asleep, 8GiB, 15m)")
        s.set_defaults(func=cmd_set, verb=verb)

    s = sub.add_parser("logs", help="the tail of a model's engine log")
    s.add_argument("model", help="the model's name (a replica: NAME#1)")
    s.add_argument("-n", "--lines", type=int, default=50, help="lines to show (default 50)")
    s.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    s.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    s.add_argument("--json", action="store_true",
                   help="one JSON object: {model, lines} (with -f: one per line)")
    s.set_defaults(func=cmd_logs)

    s = sub.add_parser("events", help="recent events (state changes, actions, reloads)")
    s.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    s.add_argument("-n", "--lines", type=int, default=30, help="recent events to show")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s.set_defaults(func=cmd_events)
