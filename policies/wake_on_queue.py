"""Wake a sleeping model when requests pile up for it.

gpud's proxy already wakes a model on its first request when the file allows; this
policy is for models the profile keeps asleep but that should answer anyway once enough
people are waiting. Set the queue depth per model below; DEFAULT_DEPTH applies to the
others (None: only the models listed).
"""

from __future__ import annotations

from gpud.policies.api import Intent, View, Wake

# Wake when at least this many requests are queued, per model name.
QUEUE_DEPTH: dict[str, int] = {
    # "chat": 1,
}
DEFAULT_DEPTH: int | None = 4


def decide(view: View) -> list[Intent]:
    intents: list[Intent] = []
    for model in view.models:
        depth = QUEUE_DEPTH.get(model.name, DEFAULT_DEPTH)
        if depth is None or model.state != "asleep":
            continue
        if model.queued >= depth:
            intents.append(Wake(model.name, f"{model.queued} requests queued (wakes at {depth})"))
    return intents
