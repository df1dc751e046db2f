"""Load phases: where a starting engine is, read from the lines of its log.

A load takes from seconds to minutes (45-136 s on an H100 for 8B models, ~30 s for a tiny
model on CPU); `starting` alone makes that a blind wait. vLLM says what it does as it goes
("Starting to load model", "Loading weights took", "init engine (profile, create kv cache,
warmup model) took", "Starting vLLM server"), so each line moves a model to a phase, and the
phase with its elapsed time is what status, the page, the events and `gpud load --wait` show.

Phases only move forward (a late line of an earlier phase does not send a model back), and
an unknown line changes nothing: a vLLM that logs differently shows fewer phases, never wrong
ones. Pure: lines and times in, the phase out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# In load order. The first phase is the process's own start (Python imports, CUDA init).
STARTING_PROCESS = "starting process"
PHASES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (STARTING_PROCESS, re.compile(r"(?!)")),
    ("reading the model config", re.compile(
        r"non-default args|Resolved architecture|Using max model len")),
    ("starting the engine core", re.compile(r"Initializing a V1 LLM engine|EngineCore")),
    ("loading weights", re.compile(
        r"Starting to load model|Loading (safetensors|pt) checkpoint shards|Loading weights"
        r"(?! took)")),
    # huggingface_hub's progress bars while vLLM fetches the weights (inside the load)
    ("downloading weights", re.compile(r"Fetching \d+ files|\.(safetensors|bin|pt):\s+\d+%")),
    # vLLM compiles (torch.compile, on GPUs), then measures memory for the KV cache
    ("compiling and profiling", re.compile(
        r"Loading weights took|Model loading took|Dynamo bytecode transform|Compiling a graph"
        r"|torch\.compile takes|Memory profiling|memory profiling|Available KV cache memory"
        r"|KV cache size|# (GPU|CPU) blocks|for KV cache")),
    ("capturing CUDA graphs", re.compile(r"Capturing CUDA graph|Graph capturing")),
    ("starting the API server", re.compile(
        r"init engine \(.*\) took|Starting vLLM (API )?server|Available routes")),
    ("waiting for /health", re.compile(r"Application startup complete")),
)
NAMES: tuple[str, ...] = tuple(name for name, _ in PHASES)
# Phases of one rank may follow each other both ways (a download happens inside the load).
_RANK = {name: i for i, name in enumerate(NAMES)}
_RANK["downloading weights"] = _RANK["loading weights"]
# gpud's own steps after the engine answers /health
WARM_SLEEP = "first sleep and wake (warm-up)"
SLEEPING = "going to sleep"


def phase_of(line: str) -> str | None:
    """The latest phase LINE belongs to, or None when it says nothing about the load."""
    for name, pattern in reversed(PHASES):
        if pattern.search(line):
            return name
    return None


@dataclass
class LoadPhases:
    """One load's phases: the current one, since when, and the ones before (with times)."""

    started: float
    phase: str = STARTING_PROCESS
    since: float = 0.0
    done: list[tuple[str, float]] = field(default_factory=list)  # (phase, seconds in it)

    def __post_init__(self) -> None:
        self.since = self.since or self.started

    def feed(self, line: str, now: float) -> bool:
        """Take one log line; True when it moved the load to a later phase."""
        found = phase_of(line)
        if found is None or found not in NAMES or self.phase not in NAMES:
            return False
        if found == self.phase or _RANK[found] < _RANK[self.phase]:
            return False
        self.enter(found, now)
        return True

    def enter(self, phase: str, now: float) -> None:
        """Move to PHASE (gpud's own steps after the engine is healthy come this way)."""
        if phase == self.phase:
            return
        self.done.append((self.phase, round(max(0.0, now - self.since), 1)))
        self.phase, self.since = phase, now

    def elapsed(self, now: float) -> tuple[float, float]:
        """(seconds in this phase, seconds since the load began)."""
        return max(0.0, now - self.since), max(0.0, now - self.started)
