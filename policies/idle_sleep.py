"""Put a model to sleep after it has been idle for its time to live (TTL).

Copy to /etc/gpud/policies/ (owned by root, mode 644) and set the TTLs below. A model
without an entry here uses its idle_sleep_after from gpud.toml, and a model with neither
is left alone. A model is idle when nothing is in flight or queued for it.
"""

from __future__ import annotations

from gpud.policies.api import Intent, Sleep, View

# Seconds of idleness before sleeping, per model name.
TTL_SECONDS: dict[str, float] = {
    # "chat": 15 * 60,
    # "batch": 5 * 60,
}


def decide(view: View) -> list[Intent]:
    intents: list[Intent] = []
    for model in view.models:
        ttl = TTL_SECONDS.get(model.name, model.idle_sleep_after)
        if ttl is None or model.state != "awake" or model.busy:
            continue
        if model.idle_seconds >= ttl:
            intents.append(
                Sleep(
                    model.name,
                    model.sleep_level,
                    f"idle for {model.idle_seconds:.0f} s (TTL {ttl:.0f} s)",
                )
            )
    return intents
