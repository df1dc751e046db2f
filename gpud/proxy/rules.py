"""Per-model request rules: defaults, forced values, removed keys and caps (llama-swap's
`setParams`/`stripParams`), applied to a request's JSON body before its engine sees it.

A model without rules never reaches this module (its `ModelRoute.rules` is None), and a
request no rule changes keeps its bytes: the body is re-encoded only when a rule changed a
value. Pure: no I/O, no aiohttp.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

# Where a cap on a field the client left out sets it: a request that names no max_tokens
# may otherwise generate up to the model's whole context.
GENERATION_PATHS: Final = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"})
# Other names of a capped field that the engine reads instead (vLLM takes
# max_completion_tokens over max_tokens): clamped too, or a client could step around a cap.
CAP_ALIASES: Final = {"max_tokens": ("max_completion_tokens",)}


@dataclass(frozen=True, slots=True)
class RequestRules:
    """One model's rules, as the config declares them (`[models.NAME.rules]`).

    `default`: set when the client sent no value (a table merges key by key into a table
    the client sent); `force`: always set (a table merges into the client's); `strip`:
    top-level keys removed; `cap`: a number clamped to at most this (set to it on the
    generation paths when absent).
    """

    default: Mapping[str, Any] = field(default_factory=dict)
    force: Mapping[str, Any] = field(default_factory=dict)
    strip: tuple[str, ...] = ()
    cap: Mapping[str, float] = field(default_factory=dict)

    def apply(self, body: bytes, path: str) -> bytes | None:
        """The body with the rules applied, or None when they change nothing (relay the
        client's bytes) or the body is not a JSON object (the engine answers it)."""
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            return None
        if not isinstance(payload, dict):
            return None
        changed = False
        for key in self.strip:
            if key in payload:
                del payload[key]
                changed = True
        for key, value in self.default.items():
            changed |= _merge(payload, key, value, over=False)
        for key, value in self.force.items():
            changed |= _merge(payload, key, value, over=True)
        for key, limit in self.cap.items():
            changed |= _cap(payload, key, limit, path in GENERATION_PATHS)
        if not changed:
            return None
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def _merge(target: dict[str, Any], key: str, value: Any, *, over: bool) -> bool:
    """Set `target[key]` to `value` (always when `over`, else only when absent); a table
    into a table goes key by key. True if anything changed."""
    have = target.get(key, _ABSENT)
    if isinstance(value, dict) and isinstance(have, dict):
        changed = False
        for k, v in value.items():
            changed |= _merge(have, k, v, over=over)
        return changed
    if have is _ABSENT or (over and not _same(have, value)):
        target[key] = value
        return True
    return False


def _cap(payload: dict[str, Any], key: str, limit: float, set_absent: bool) -> bool:
    names = (key, *CAP_ALIASES.get(key, ()))
    present = [n for n in names if _is_number(payload.get(n))]
    changed = False
    for name in present:
        if payload[name] > limit:
            payload[name] = _num(limit)
            changed = True
    if not present and set_absent and payload.get(key) is None:
        payload[key] = _num(limit)
        changed = True
    return changed


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b  # 1 and true and 1.0 differ on the wire


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _num(v: float) -> int | float:
    """A whole float as an int: `max_tokens` 512.0 is refused by vLLM's schema."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


_ABSENT: Final = object()
