"""`gpud set` / `gpud unset`: change one key of the desired-state file, keeping its layout.

Every comment, blank line and the order of keys stay as the operator wrote them (tomlkit
round-trips the document); only the line of the changed key differs. The result is
validated with `load_config` on a copy, beside the real drop-ins, before the file is
touched: an invalid value is refused with the located error and the file stays
byte-identical. The write is atomic (a temp file in the same directory, fsync, rename) and
keeps the file's mode and owner. Pure core apart from that file I/O: no asyncio, aiohttp,
subprocess or network (the CLI asks the daemon to reload).
"""

from __future__ import annotations

import difflib
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.container import Container
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import AoT, Array, InlineTable, Item, Table

from gpud.config.load import ConfigError, load_config

__all__ = ["EditError", "EditResult", "edit_file", "parse_key", "parse_value", "set_key",
           "unset_key"]

_Node = Container | Table | InlineTable | AoT | Array


class EditError(Exception):
    """The edit cannot be made; the message says why and what to write instead."""


@dataclass(frozen=True)
class EditResult:
    path: Path
    before: str
    after: str
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def diff(self) -> str:
        return "".join(difflib.unified_diff(
            self.before.splitlines(keepends=True), self.after.splitlines(keepends=True),
            fromfile=f"{self.path} (before)", tofile=f"{self.path} (after)"))


def parse_key(key: str) -> list[str]:
    """A dotted key as TOML reads it: `models.chat.state`, `models."qwen2.5".state`,
    `schedule.0.when` (a number picks an entry of an array of tables)."""
    try:
        doc = tomlkit.parse(f"{key} = 0")
    except TOMLKitError:
        raise EditError(
            f"{key!r} is not a key: write table and key names joined by dots, e.g. "
            "models.chat.state; quote a name that holds a dot: models.\"qwen2.5\".state"
        ) from None
    parts: list[str] = []
    node: Any = doc
    while isinstance(node, dict) and len(node) == 1:
        name = next(iter(node))
        parts.append(str(name))
        node = node[name]
    if not parts or isinstance(node, dict):
        raise EditError(f"{key!r} is not a single key")
    return parts


def parse_value(text: str) -> Any:
    """VALUE as TOML when it parses (`2`, `true`, `["a", "b"]`, `{ state = "awake" }`,
    `"quoted"`), else the text itself as a string (`asleep`, `8GiB`, `15m`)."""
    try:
        return tomlkit.parse(f"v = {text}")["v"]
    except TOMLKitError:
        return text


def _child(node: _Node, part: str, key: str, *, create: bool) -> Any:
    if isinstance(node, AoT | Array):
        if not part.isdigit():
            raise EditError(f"{key}: {part!r} is a list here; pick an entry by its number "
                            f"(0 to {len(node) - 1})")
        index = int(part)
        if index >= len(node):
            raise EditError(f"{key}: there are {len(node)} entries; pick 0 to {len(node) - 1}")
        return node[index]
    if part in node:
        return node[part]
    if not create:
        raise EditError(f"{key}: {part!r} is not set in the file")
    new = tomlkit.table()
    node[part] = new
    return node[part]


def _parent(doc: tomlkit.TOMLDocument, parts: list[str], key: str, *, create: bool) -> _Node:
    node: Any = doc
    for part in parts[:-1]:
        node = _child(node, part, key, create=create)
        if not isinstance(node, Container | Table | InlineTable | AoT | Array):
            raise EditError(f"{key}: {part!r} holds a value, not a table")
    return node  # type: ignore[no-any-return]


def set_key(text: str, key: str, value: Any) -> str:
    """The document with KEY set to VALUE; comments and layout untouched elsewhere."""
    parts = parse_key(key)
    doc = tomlkit.parse(text)
    parent = _parent(doc, parts, key, create=True)
    last = parts[-1]
    if isinstance(parent, AoT | Array):
        if not last.isdigit() or int(last) >= len(parent):
            raise EditError(f"{key}: pick an existing entry by its number (0 to "
                            f"{len(parent) - 1})")
        parent[int(last)] = value
    else:
        existing = parent.get(last)
        if isinstance(existing, Table | AoT) and not isinstance(value, dict | list):
            raise EditError(f"{key} is a table; set one of its keys, e.g. {key}.NAME")
        parent[last] = value
    return tomlkit.dumps(doc)


def unset_key(text: str, key: str) -> str:
    """The document without KEY (the default applies again)."""
    parts = parse_key(key)
    doc = tomlkit.parse(text)
    parent = _parent(doc, parts, key, create=False)
    last = parts[-1]
    if isinstance(parent, AoT | Array):
        if not last.isdigit() or int(last) >= len(parent):
            raise EditError(f"{key}: pick an existing entry by its number")
        del parent[int(last)]
    else:
        if last not in parent:
            raise EditError(f"{key} is not set in the file (nothing to unset)")
        del parent[last]
    return tomlkit.dumps(doc)


def validate_text(path: Path, text: str) -> None:
    """Raise ConfigError when TEXT, in place of PATH (with PATH's drop-ins), is invalid.

    The copy keeps the file's name and sees the real drop-in directory, so errors name the
    same keys and lines; paths in messages are rewritten to the real file."""
    tmpdir = Path(tempfile.mkdtemp(prefix="gpud-edit-"))
    try:
        copy = tmpdir / path.name
        copy.write_text(text, encoding="utf-8")
        dropins = path.parent / (path.stem + ".d")
        if dropins.is_dir():
            (tmpdir / dropins.name).symlink_to(dropins.resolve(), target_is_directory=True)
        try:
            load_config(copy)
        except ConfigError as exc:
            for i, err in enumerate(exc.errors):
                if err.file == str(copy):
                    exc.errors[i] = type(err)(err.message, err.key, str(path), err.line, err.col)
                elif err.file.startswith(str(tmpdir)):
                    real = str(path.parent) + err.file[len(str(tmpdir)):]
                    exc.errors[i] = type(err)(err.message, err.key, real, err.line, err.col)
            raise ConfigError(exc.errors) from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def write_atomic(path: Path, text: str) -> list[str]:
    """Replace PATH with TEXT in one rename, keeping its mode and owner. Returns warnings."""
    warnings: list[str] = []
    target = path.resolve()  # a symlinked config stays a symlink; its target is rewritten
    st = target.stat()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, stat.S_IMODE(st.st_mode))
        tst = tmp.stat()
        if (tst.st_uid, tst.st_gid) != (st.st_uid, st.st_gid):
            try:
                os.chown(tmp, st.st_uid, st.st_gid)
            except PermissionError:
                warnings.append(f"could not keep the owner of {target} (uid {st.st_uid}, gid "
                                f"{st.st_gid}); it is now owned by uid {tst.st_uid}")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)
    return warnings


def edit_file(path: Path, key: str, value: Any = None, *, unset: bool = False,
              dry_run: bool = False) -> EditResult:
    """Set (or unset) KEY in PATH: edit, validate, then write atomically.

    Raises EditError for a key that cannot be edited and ConfigError (located in PATH) for
    a result that would not load; in both cases PATH is left untouched."""
    try:
        before = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise EditError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise EditError(f"{path} is not UTF-8 text") from None
    try:
        after = unset_key(before, key) if unset else set_key(before, key, value)
    except TOMLKitError as exc:
        raise EditError(f"{path}: cannot edit: {exc}") from None
    if before.endswith("\n") and not after.endswith("\n"):
        after += "\n"  # a table added at the end
    result = EditResult(path, before, after)
    if not result.changed:
        return result
    validate_text(path, after)
    if dry_run:
        return result
    warnings = write_atomic(path, after)
    return EditResult(path, before, after, tuple(warnings))


def plain(value: Any) -> Any:
    """A tomlkit value as plain Python (for messages)."""
    return value.unwrap() if isinstance(value, Item) else value
