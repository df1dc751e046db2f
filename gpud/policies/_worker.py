"""The process that runs one policy script: ``python -P -m gpud.policies._worker FD``.

Why a process: a policy may sleep, loop forever or crash the interpreter, and a thread
cannot be stopped; the runner kills this process instead and the daemon carries on.

Protocol over the socket FD (multiprocessing Connection framing): the runner sends one
pickled ``("load", name, path, source)``; this process answers JSON ``{"started": true}``
as soon as it runs, then ``{"ready": true}``
or ``{"error": "..."}``; then each pickled ``("decide", view)`` gets JSON
``{"intents": [...]}`` or ``{"error": "..."}``; ``None`` or a closed socket ends it.
Answers are JSON rather than pickle so the daemon never unpickles what a script made.

It must never import the daemon (only ``gpud.policies.api`` and the standard library):
it starts on every policy change and should start fast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable
from multiprocessing.connection import Connection

from gpud.policies.api import INTENT_TYPES, View


def main(argv: list[str]) -> int:
    conn = Connection(int(argv[1]))
    # Ctrl-C in the daemon's terminal reaches the whole process group; the runner owns
    # this process's end, so a stray traceback here would only be noise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_when_orphaned()
    # Started: the runner's clock for loading the script starts now, not at spawn, so a
    # busy box starting many workers at once does not count against the script.
    conn.send_bytes(b'{"started": true}')
    message = pickle.loads(conn.recv_bytes())
    _, name, path, source = message
    decide = _load(conn, name, path, source)
    if decide is None:
        return 1
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return 0
        request = pickle.loads(data)
        if request is None:
            return 0
        _, view = request
        conn.send_bytes(json.dumps(_decide(decide, view, path)).encode())


def _load(conn: Connection, name: str, path: str, source: bytes) -> Callable[[View], object] | None:
    module = types.ModuleType(f"gpud_policy_{name}")
    module.__file__ = path
    # Registered so that dataclasses and pickling inside the script can find the module.
    sys.modules[module.__name__] = module
    try:
        exec(compile(source, path, "exec"), module.__dict__)
    # A script that raises anything at import, SystemExit included, is reported, not fatal.
    except BaseException as exc:
        conn.send_bytes(json.dumps({"error": f"loading failed: {_describe(exc, path)}"}).encode())
        return None
    decide = getattr(module, "decide", None)
    if not callable(decide):
        conn.send_bytes(
            json.dumps(
                {"error": "has no decide(view) function; define def decide(view): return [...]"}
            ).encode()
        )
        return None
    conn.send_bytes(b'{"ready": true}')
    return decide  # type: ignore[no-any-return]


def _decide(decide: Callable[[View], object], view: View, path: str) -> dict[str, object]:
    try:
        result = decide(view)
    # Report everything the script raises, SystemExit included, with where it happened.
    except BaseException as exc:
        return {"error": f"decide() raised {_describe(exc, path)}"}
    if not isinstance(result, list | tuple):
        return {
            "error": f"decide() returned {_short(result)}; return a list of intents "
            "(an empty list when there is nothing to do)"
        }
    intents: list[dict[str, object]] = []
    for index, intent in enumerate(result):
        if not isinstance(intent, INTENT_TYPES):
            kinds = ", ".join(t.__name__ for t in INTENT_TYPES)
            return {
                "error": f"decide() returned {_short(intent)} at index {index}; every item "
                f"must be one of {kinds} from gpud.policies.api"
            }
        intents.append({"kind": type(intent).__name__, **dataclasses.asdict(intent)})
    return {"intents": intents}


def _describe(exc: BaseException, path: str) -> str:
    """'ZeroDivisionError: division by zero (line 7, in decide)': the innermost frame of
    the script itself, since that is the line its author needs."""
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == path]
    if frames:
        text += f" (line {frames[-1].lineno}, in {frames[-1].name})"
    return text


def _short(value: object) -> str:
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{text} (a {type(value).__name__})"


def _exit_when_orphaned() -> None:
    """Exit if the daemon dies while a script loops: nobody would ever kill us then."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
