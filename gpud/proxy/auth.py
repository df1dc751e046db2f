"""API keys for the inference endpoint: who may call, and which models.

Keys are held only as SHA-256 digests and compared in constant time. A key
never appears in a log line, an error message or a repr. A key file must not
be readable by group or others (`check_key_file`, also called by `gpud check`).
No I/O other than reading a key file when asked.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gpud.config.load import secret_file_problem

_HEX = frozenset("0123456789abcdef")


def hash_key(key: str) -> str:
    """The sha256 hex digest to put in `key_hash` for this key."""
    return hashlib.sha256(key.encode()).hexdigest()


def check_key_hash(value: str) -> str | None:
    """None when `value` is a sha256 hex digest, else what is wrong with it."""
    v = value.strip().lower()
    if len(v) != 64 or not set(v) <= _HEX:
        return "key_hash must be 64 hex digits (the sha256 of the key: `gpud hash-key`)"
    return None


def check_key_file(path: str | os.PathLike[str]) -> str | None:
    """None when the key file is usable, else a message for the operator.

    Refused: missing, not a regular file, empty, or readable/writable by
    group or others (a key in a world-readable file is a leaked key).
    """
    p = Path(path)
    problem = secret_file_problem(p)  # the same rule `gpud check` applies
    if problem is not None:
        return f"key file {problem}"
    try:
        key = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        return f"key file {p}: cannot read it ({e})"
    if not key:
        return f"key file {p}: empty"
    return None


def read_key_file(path: str | os.PathLike[str]) -> str:
    """The key in a key file (stripped); ValueError with `check_key_file`'s message."""
    problem = check_key_file(path)
    if problem is not None:
        raise ValueError(problem)
    return Path(path).read_text(encoding="utf-8").strip()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One `[[auth.keys]]` entry, resolved: the key itself is never kept."""

    name: str
    digest: bytes  # sha256 of the key
    models: frozenset[str] | None = None  # None: every model

    def __repr__(self) -> str:
        return f"ApiKey(name={self.name!r}, models={self.models!r})"

    @classmethod
    def from_hash(cls, name: str, key_hash: str, models: Iterable[str] | None = None) -> ApiKey:
        problem = check_key_hash(key_hash)
        if problem is not None:
            raise ValueError(f"auth key {name!r}: {problem}")
        return cls(name, bytes.fromhex(key_hash.strip()), _models(models))

    @classmethod
    def from_file(
        cls, name: str, key_file: str | os.PathLike[str], models: Iterable[str] | None = None
    ) -> ApiKey:
        try:
            key = read_key_file(key_file)
        except ValueError as e:
            raise ValueError(f"auth key {name!r}: {e}") from None
        return cls(name, hashlib.sha256(key.encode()).digest(), _models(models))

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


def _models(models: Iterable[str] | None) -> frozenset[str] | None:
    return None if models is None else frozenset(models)


class KeyRing:
    """The configured keys. Empty: inference is open (no keys configured)."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self._keys = tuple(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[ApiKey]:
        return iter(self._keys)

    def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The key named by an `Authorization: Bearer <key>` header, or None.

        Compares the digest against every entry without stopping at a match,
        so the time taken says nothing about which key (if any) matched.
        """
        if not authorization or not authorization.startswith(("Bearer ", "bearer ")):
            return None
        presented = hashlib.sha256(authorization[7:].strip().encode()).digest()
        found: ApiKey | None = None
        for key in self._keys:
            if hmac.compare_digest(presented, key.digest) and found is None:
                found = key
        return found
