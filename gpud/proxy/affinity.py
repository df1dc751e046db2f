"""Prefix-affine replica choice: a conversation's turns go back to the replica that served
its start, where vLLM's prefix cache still holds it, unless that replica is busier than
the least loaded one by more than a margin.

Least-outstanding balancing alone scatters a conversation's turns over the replicas, and
each turn resends the whole conversation: a replica that never saw it prefills it all
again. Here a conversation is known by a hash of its start (the messages up to the first
user message, or the prompt's first characters): the same for every turn of it. The first
turn goes where least-outstanding sends it and is remembered; later turns follow it there.
Pure: no I/O, no aiohttp (the backend keeps the table, the proxy computes the key).
"""

from __future__ import annotations

import collections
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, Final

PROMPT_LEAD: Final = 2048  # characters of a completion prompt that name its conversation
TABLE_SIZE: Final = 65536  # conversations remembered per backend (least recent forgotten)


def conversation_key(body: bytes) -> str | None:
    """A key that every turn of one conversation shares, or None (no conversation found:
    the request is balanced by load alone)."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(payload, dict):
        return None
    lead = _lead(payload)
    if lead is None:
        return None
    text = json.dumps(lead, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _lead(payload: dict[str, Any]) -> object:
    """The start of the conversation: chat messages up to the first user message (with an
    Anthropic-style `system`), a responses `input` likewise, or a prompt's first characters."""
    for field in ("messages", "input"):
        msgs = payload.get(field)
        if isinstance(msgs, list) and msgs:
            head = []
            for m in msgs:
                head.append(m)
                if isinstance(m, dict) and m.get("role") == "user":
                    break
            return [payload.get("system"), head]
        if isinstance(msgs, str):
            return msgs[:PROMPT_LEAD]
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return prompt[:PROMPT_LEAD]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return prompt[:PROMPT_LEAD // 4]  # token ids
    user = payload.get("user")
    return user if isinstance(user, str) and user else None


class AffinityTable:
    """Where each recent conversation was served, per model: (model, key) -> engine URL."""

    def __init__(self, size: int = TABLE_SIZE) -> None:
        self.size = size
        self._where: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()
        self.followed = 0  # turns sent back to their replica
        self.moved = 0  # turns sent elsewhere: the replica was gone or too busy

    def choose(self, model: str, key: str, candidates: Sequence[str], least: str,
               load: Callable[[str], int], margin: int) -> str:
        """The replica for this turn among `candidates`: the conversation's own, unless it is
        not serving or has more than `margin` requests outstanding beyond `least` (the
        least-outstanding choice), then `least`. Remembers the answer."""
        k = (model, key)
        had = self._where.get(k)
        if had is not None and had in candidates and load(had) <= load(least) + margin:
            choice = had
            self.followed += 1
        else:
            choice = least
            if had is not None:
                self.moved += 1
        self._where[k] = choice
        self._where.move_to_end(k)
        while len(self._where) > self.size:
            self._where.popitem(last=False)
        return choice

    def __len__(self) -> int:
        return len(self._where)
