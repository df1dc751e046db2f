"""The KV pool's wire format, shared by ``server`` (gpud) and ``client`` (engines).

One message is one SOCK_SEQPACKET datagram: a UTF-8 JSON object, with the
page fds it speaks of attached as SCM_RIGHTS in the order its "pages" list
names them. Requests carry an "id"; replies repeat it. gpud may send an
engine a "give_back" request at any time; the engine answers "gave_back".

This module must never do I/O: it only names and checks messages.

Engine -> gpud:
  {"op": "hello", "id", "tenant", "gpu", "version"}       -> "welcome" | "error"
  {"op": "grant", "id", "pages": N}                        -> "pages"* then "granted"
  {"op": "return", "id", "pages": [page, ...]}            -> "returned"
  {"op": "gave_back", "id", "pages": [page, ...]}         (answers a give_back)
  {"op": "status", "id"}                                   -> "status"
gpud -> engine:
  {"op": "pages", "id", "pages": [[page, offset], ...]}    + one fd per page (none without backend)
  {"op": "granted", "id", "count", "refused", "reason"}
  {"op": "give_back", "id", "pages": N}                     unmap N pages, then answer gave_back
"""

from __future__ import annotations

import json
from typing import Any

VERSION = 1
# Linux allows at most 253 fds in one SCM_RIGHTS message (SCM_MAX_FD); stay well under.
MAX_FDS_PER_MESSAGE = 128
MAX_MESSAGE = 64 * 1024

Message = dict[str, Any]


class ProtocolError(ValueError):
    """A message that is not what the other side should send."""


def encode(msg: Message) -> bytes:
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes is over the {MAX_MESSAGE}-byte limit")
    return data


def decode(data: bytes) -> Message:
    try:
        msg = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"not a JSON message: {e}") from e
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ProtocolError("a message must be a JSON object with an 'op'")
    return msg


def int_list(msg: Message, key: str) -> list[int]:
    value = msg.get(key)
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ProtocolError(f"{msg.get('op')!r}: {key!r} must be a list of page numbers")
    return value


def count(msg: Message, key: str) -> int:
    value = msg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"{msg.get('op')!r}: {key!r} must be a count >= 0")
    return value
