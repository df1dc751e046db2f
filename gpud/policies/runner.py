"""Load the operator's policy scripts and run them, each in its own process, with a time limit.

Purpose: turn ``decide(view)`` of every ``*.py`` in the policies directory into validated
intents plus a status per script that says, in words, why a script is not running. A
script that raises, overruns its time limit, returns something that is not a list of
intents or names a model gpud does not run is disabled until its file changes (touch it
to retry); the others keep working.

It must never run a script in the daemon's process (a script can loop forever, and a
thread cannot be killed), never load a file that someone other than root or the daemon's
user could have written, and never unpickle what a script produced (answers come back
as JSON). The API is synchronous: the daemon calls it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import reprlib
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

from gpud.policies.api import INTENT_TYPES, Intent, View

__all__ = ["PolicyRunner", "PolicyStatus"]

# A policy is a small script; anything bigger is more likely a mistake than a policy.
MAX_SOURCE_BYTES = 1 << 20
MAX_ANSWER_BYTES = 4 << 20
# Starting Python takes ~0.1 s; this only catches a box too swamped to start one at all.
STARTUP_TIMEOUT = 30.0
# What a status or log line quotes of a bad answer: enough to recognise it, never megabytes
# or a structure nested too deep to print.
MAX_REASON_CHARS = 600
_quote = reprlib.Repr()
_quote.maxlevel, _quote.maxstring, _quote.maxother, _quote.maxlist, _quote.maxdict = 3, 80, 80, 4, 4
_INTENTS_BY_KIND: dict[str, type[Intent]] = {t.__name__: t for t in INTENT_TYPES}
# The directory that holds the gpud package, for the worker's import path.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class PolicyStatus:
    """How one script is doing, for the status page, ``gpud status`` and the JSON API."""

    name: str
    path: Path
    enabled: bool
    error: str | None = None
    last_run_ms: float | None = None
    last_intents: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "path": str(self.path),
            "enabled": self.enabled,
            "error": self.error,
            "last_run_ms": self.last_run_ms,
            "last_intents": self.last_intents,
        }


class _Worker:
    """One running ``gpud.policies._worker`` process and our end of its socket."""

    def __init__(self, name: str, path: Path, source: bytes) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        try:
            # -P: the working directory never lands on sys.path, so a file in the policies
            # directory cannot shadow a module the worker imports.
            self.process = subprocess.Popen(
                [sys.executable, "-P", "-m", "gpud.policies._worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                cwd="/",
                env=env,
            )
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send_bytes(pickle.dumps(("load", name, str(path), source)))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.conn.close()

    def stop(self) -> None:
        """Ask the worker to exit; ``kill`` afterwards reaps it (or forces it)."""
        with contextlib.suppress(OSError):  # already gone: kill() reaps it
            self.conn.send_bytes(pickle.dumps(None))

    def receive(self) -> dict[str, object]:
        """One JSON answer; ValueError with a reason for people if there is none."""
        try:
            data = self.conn.recv_bytes(MAX_ANSWER_BYTES)
        except (EOFError, ConnectionError):
            code = self.process.wait()
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            raise ValueError(f"its worker process {how} (did the script exit or crash?)") from None
        except OSError:
            raise ValueError(
                f"it answered with more than {MAX_ANSWER_BYTES >> 20} MiB; return fewer intents"
            ) from None
        try:
            answer = json.loads(data)
        # A script runs in the worker and can send any bytes: nested too deep to parse
        # (RecursionError), not UTF-8, not JSON.
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"its worker answered {len(data)} bytes that are not JSON gpud "
                             f"can read ({type(exc).__name__})") from None
        if not isinstance(answer, dict):
            raise ValueError(f"its worker answered {_quote.repr(answer)}, which gpud cannot read")
        return answer


@dataclass
class _Policy:
    name: str
    path: Path
    fingerprint: tuple[int, str] | None = None  # (mtime_ns, sha256) of what was loaded
    worker: _Worker | None = None
    error: str | None = None
    last_run_ms: float | None = None
    last_intents: int = 0

    def status(self) -> PolicyStatus:
        return PolicyStatus(
            self.name,
            self.path,
            self.error is None and self.worker is not None,
            self.error,
            self.last_run_ms,
            self.last_intents,
        )

    def disable(self, why: str) -> None:
        if self.worker is not None:
            self.worker.kill()
            self.worker = None
        if len(why) > MAX_REASON_CHARS:
            why = why[: MAX_REASON_CHARS - 3] + "..."
        self.error = f"{why}; disabled until {self.path} changes (touch it to retry)"


class PolicyRunner:
    """The scripts of one directory; ``reload()`` picks up changes, ``evaluate()`` runs them.

    ``timeout`` bounds each ``decide`` call (all scripts run in parallel, so one
    evaluate takes at most about ``timeout``); ``load_timeout`` bounds a script's import.
    ``allowed_uids`` are the owners whose files are trusted: root and the daemon's user
    by default.
    """

    def __init__(
        self,
        directory: Path,
        timeout: float = 0.2,
        allowed_uids: Collection[int] | None = None,
        load_timeout: float = 5.0,
    ) -> None:
        self.directory = directory
        self.timeout = timeout
        self.load_timeout = load_timeout
        self.allowed_uids = frozenset(
            allowed_uids if allowed_uids is not None else {0, os.geteuid()}
        )
        self._policies: dict[str, _Policy] = {}
        # reload() and evaluate() may come from different threads of the daemon.
        self._lock = threading.Lock()

    def __enter__(self) -> PolicyRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------------- public

    def reload(self) -> list[PolicyStatus]:
        """Rescan the directory: start scripts that are new or changed, stop removed ones,
        refuse unsafe files. Unchanged scripts keep their worker (and a disabled one stays
        disabled). Cheap when nothing changed; call it on every file event or tick."""
        with self._lock:
            found = self._scan()
            for name in set(self._policies) - set(found):
                policy = self._policies.pop(name)
                if policy.worker is not None:
                    policy.worker.stop()
                    policy.worker.kill()
            loading: list[_Policy] = []
            for name, path in found.items():
                policy = self._policies.setdefault(name, _Policy(name, path))
                if self._refresh(policy):
                    loading.append(policy)
            self._await_loads(loading)
            return self._statuses()

    def evaluate(self, view: View) -> tuple[list[Intent], list[PolicyStatus]]:
        """Run every enabled script on ``view``; return the intents of the scripts that
        behaved (each with ``policy`` set to the script's name), in script-name order,
        and every script's status."""
        with self._lock:
            data = pickle.dumps(("decide", view))
            started = time.monotonic()
            running: dict[Connection, _Policy] = {}
            for policy in self._policies.values():
                if policy.worker is None or policy.error is not None:
                    continue
                try:
                    policy.worker.conn.send_bytes(data)
                except OSError:
                    policy.disable("its worker process is gone")
                    continue
                running[policy.worker.conn] = policy
            answers: dict[str, list[Intent]] = {}
            deadline = started + self.timeout
            while running:
                left = deadline - time.monotonic()
                ready = wait(list(running), timeout=max(left, 0.0)) if left > 0 else []
                if not ready:
                    break
                for conn in ready:
                    assert isinstance(conn, Connection)
                    policy = running.pop(conn)
                    policy.last_run_ms = round((time.monotonic() - started) * 1000, 1)
                    try:
                        intents = self._answer(policy, view)
                    # Whatever an answer does to gpud's side, it costs that policy only.
                    except Exception as exc:
                        policy.disable(f"gpud could not read its answer: {type(exc).__name__}: "
                                       f"{_quote.repr(exc)}")
                        intents = None
                    if intents is not None:
                        answers[policy.name] = intents
                        policy.last_intents = len(intents)
            for policy in running.values():
                policy.last_run_ms = None
                policy.disable(f"decide() did not return within {self.timeout * 1000:.0f} ms")
            intents = [i for name in sorted(answers) for i in answers[name]]
            return intents, self._statuses()

    def statuses(self) -> list[PolicyStatus]:
        with self._lock:
            return self._statuses()

    def close(self) -> None:
        """Stop every worker (politely, then by force after a short wait)."""
        with self._lock:
            workers = [p.worker for p in self._policies.values() if p.worker is not None]
            for worker in workers:
                worker.stop()
            deadline = time.monotonic() + 0.5
            for worker in workers:
                with contextlib.suppress(subprocess.TimeoutExpired):  # kill() below
                    worker.process.wait(timeout=max(deadline - time.monotonic(), 0.01))
                worker.kill()
            self._policies.clear()

    # ---------------------------------------------------------------------- internals

    def _statuses(self) -> list[PolicyStatus]:
        return [self._policies[name].status() for name in sorted(self._policies)]

    def _scan(self) -> dict[str, Path]:
        try:
            entries = sorted(self.directory.iterdir())
        except FileNotFoundError:
            return {}  # no directory, no policies: the default for most boxes
        # Files starting with "_" or "." are helpers or editor leftovers, not policies.
        return {
            p.stem: p
            for p in entries
            if p.suffix == ".py" and not p.name.startswith(("_", ".")) and not p.is_dir()
        }

    def _refresh(self, policy: _Policy) -> bool:
        """Check and read the file; start a new worker if it changed. True if started."""
        try:
            source, fingerprint = self._read_trusted(policy.path)
        except (ValueError, OSError) as exc:
            if policy.worker is not None:
                policy.worker.kill()
                policy.worker = None
            policy.fingerprint = None
            why = exc if isinstance(exc, ValueError) else f"cannot read it: {exc.strerror}"
            policy.error = f"refused: {why}"
            return False
        if fingerprint == policy.fingerprint:
            return False
        if policy.worker is not None:
            policy.worker.stop()
            policy.worker.kill()
        policy.fingerprint = fingerprint
        policy.error = None
        policy.last_run_ms = None
        policy.last_intents = 0
        try:
            policy.worker = _Worker(policy.name, policy.path, source)
        except OSError as exc:
            policy.worker = None
            policy.error = f"cannot start a worker process: {exc}"
            return False
        return True

    def _await_loads(self, loading: list[_Policy]) -> None:
        """Wait, for all new workers at once, until each has started (within
        STARTUP_TIMEOUT) and then loaded its script (within ``load_timeout``)."""
        now = time.monotonic()
        pending = {p.worker.conn: p for p in loading if p.worker is not None}
        deadlines = {conn: now + STARTUP_TIMEOUT for conn in pending}
        started: set[Connection] = set()
        while pending:
            left = min(deadlines[c] for c in pending) - time.monotonic()
            ready = wait(list(pending), timeout=max(left, 0.0))
            for conn in ready:
                assert isinstance(conn, Connection)
                policy = pending[conn]
                try:
                    assert policy.worker is not None
                    answer = policy.worker.receive()
                except ValueError as exc:
                    del pending[conn]
                    policy.disable(f"loading failed: {exc}")
                    continue
                if "started" in answer and conn not in started:
                    started.add(conn)
                    deadlines[conn] = time.monotonic() + self.load_timeout
                    continue
                del pending[conn]
                if "error" in answer:
                    policy.disable(str(answer["error"]))
            now = time.monotonic()
            for conn in [c for c in pending if deadlines[c] <= now]:
                policy = pending.pop(conn)
                if conn in started:
                    policy.disable(
                        f"loading took longer than {self.load_timeout:g} s (does the script "
                        "do slow work at import time?)"
                    )
                else:
                    policy.disable(f"its worker process did not start within {STARTUP_TIMEOUT:g} s")

    def _answer(self, policy: _Policy, view: View) -> list[Intent] | None:
        """The intents of one answer, or None after disabling the policy with the reason."""
        assert policy.worker is not None
        try:
            answer = policy.worker.receive()
        except ValueError as exc:
            policy.disable(str(exc))
            return None
        if "error" in answer:
            policy.disable(str(answer["error"]))
            return None
        raw = answer.get("intents")
        if not isinstance(raw, list):
            policy.disable(f"its worker answered {_quote.repr(answer)}, which gpud cannot read")
            return None
        known = view.model_names
        intents: list[Intent] = []
        for item in raw:
            kind = (
                _INTENTS_BY_KIND.get(str(item.pop("kind", ""))) if isinstance(item, dict) else None
            )
            if kind is None or not isinstance(item, dict):
                policy.disable(f"its worker answered {_quote.repr(item)}, which gpud cannot read")
                return None
            item["policy"] = policy.name
            try:
                intent = kind(**item)
            except (TypeError, ValueError, RecursionError) as exc:
                policy.disable(f"decide() returned an invalid {kind.__name__}: {exc}")
                return None
            if intent.model not in known:
                names = ", ".join(sorted(known)) or "none"
                policy.disable(
                    f"decide() returned {kind.__name__} for model {intent.model!r}, which gpud "
                    f"does not run (models: {names})"
                )
                return None
            intents.append(intent)
        return intents

    def _read_trusted(self, path: Path) -> tuple[bytes, tuple[int, str]]:
        """The file's bytes and fingerprint, if its owner and mode say only root or the
        daemon's user could have written it; ValueError saying what to fix otherwise."""
        self._check_trusted(self.directory, os.stat(self.directory), "the policies directory")
        # Check the opened file, not the name, so it cannot be swapped between the check
        # and the read. Symlinks are followed (packages may link shipped examples in), and
        # the file they lead to is the one checked.
        with open(path, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ValueError(f"{path} is not a regular file")
            self._check_trusted(path, info, "policy file")
            source = handle.read(MAX_SOURCE_BYTES + 1)
        if len(source) > MAX_SOURCE_BYTES:
            raise ValueError(
                f"{path} is larger than {MAX_SOURCE_BYTES >> 20} MiB; a policy is a small script"
            )
        return source, (info.st_mtime_ns, hashlib.sha256(source).hexdigest())

    def _check_trusted(self, path: Path, info: os.stat_result, what: str) -> None:
        owners = " or ".join(
            "root" if uid == 0 else f"uid {uid}" for uid in sorted(self.allowed_uids)
        )
        if info.st_uid not in self.allowed_uids:
            raise ValueError(
                f"{what} {path} is owned by uid {info.st_uid}; only files owned by {owners} "
                f"are loaded: chown root: {path}"
            )
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ValueError(
                f"{what} {path} is writable by group or others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}), so anyone could change what gpud runs: "
                f"chmod go-w {path}"
            )
