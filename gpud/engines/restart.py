"""When to start a crashed engine again: exponential backoff, a cap, and giving up.

Pure bookkeeping on times the caller passes in (time.monotonic() in the daemon, plain
numbers in tests); it must never sleep, read a clock or touch a process. One instance per
engine instance, owned by the reconciler: the only place gpud computes a backoff.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RestartPolicy:
    """Backoff after consecutive crashes: `initial`, doubling, at most `cap` seconds.
    After `max_tries` restarts in a row that crashed again, the model is `failed` and is
    not restarted until `reset()` (a config change or an operator's `gpud load`). A run
    that stayed up `stable_after` seconds counts as a success: the count starts over."""

    initial: float = 2.0
    cap: float = 300.0
    max_tries: int = 5
    stable_after: float = 120.0
    factor: float = 2.0

    consecutive: int = field(default=0, init=False)
    """Crashes in a row, not separated by a stable run."""
    restarts: int = field(default=0, init=False)
    """Restarts over the model's life (shown in status)."""
    failed: bool = field(default=False, init=False)
    started_at: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.cap < self.initial or self.max_tries < 0:
            raise ValueError(
                f"restart policy: need 0 < initial <= cap and max_tries >= 0, got "
                f"initial={self.initial}, cap={self.cap}, max_tries={self.max_tries}"
            )

    def started(self, now: float) -> None:
        """The engine was (re)started at `now`."""
        self.started_at = now

    def crashed(self, now: float) -> float | None:
        """The engine died (or never became healthy) at `now`: seconds to wait before the
        next start, or None when it has failed for good."""
        if self.started_at is not None and now - self.started_at >= self.stable_after:
            self.consecutive = 0
        self.started_at = None
        if self.failed:
            return None
        if self.consecutive >= self.max_tries:
            self.failed = True
            return None
        delay = min(self.cap, self.initial * self.factor**self.consecutive)
        self.consecutive += 1
        self.restarts += 1
        return delay

    def succeeded(self) -> None:
        """The engine became healthy: the next crash starts the backoff over (supervisor's
        "started" after startsecs; gpud's health check is that proof)."""
        self.consecutive = 0
        self.started_at = None

    def reset(self) -> None:
        """Forget the crashes (not the restart total): the next crash waits `initial`."""
        self.consecutive = 0
        self.failed = False
