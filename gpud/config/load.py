"""Load the desired-state file: read, merge drop-ins, validate, cross-check, locate errors.

Every error names FILE:LINE:COL and the key path, and says what is allowed. This module reads
files but never starts anything; a failed load never replaces a running config.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import stat
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from gpud.config.engine_args import (
    FORBIDDEN_ARGS,
    FORBIDDEN_ENV,
    command_problem,
    option_name,
)
from gpud.config.locate import Locator
from gpud.config.read import MAX_DEPTH, ReadProblem, decode, deepest, read_limited, too_deep
from gpud.config.schema import MAX_ENTRIES, GpudConfig
from gpud.config.units import shown

DEFAULT_PATH = Path("/etc/gpud/gpud.toml")
EMBEDDED_DEFAULT = Path(__file__).resolve().parent.parent / "data" / "default.toml"
LOCAL_SOURCE = ("/", "./", "../", "~")  # a path; anything else may be a Hugging Face id

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ErrorItem:
    """One problem in the file, located for a person."""

    message: str
    key: str = ""
    file: str = ""
    line: int = 0
    col: int = 0

    def __str__(self) -> str:
        where = self.file
        if self.line:
            where = f"{where}:{self.line}:{self.col}"
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} {self.message}" if where else f"{key.strip()} {self.message}"


class ConfigError(Exception):
    """The file is invalid; `errors` lists every problem found."""

    def __init__(self, errors: list[ErrorItem]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


class EmptyConfigError(ConfigError):
    """A file declares nothing: most often one caught mid-save (truncated, not yet written)."""


@dataclass(frozen=True)
class Source:
    path: Path
    text: str
    data: dict[str, Any]


@dataclass(frozen=True)
class LoadedConfig:
    """A valid config with where it came from."""

    config: GpudConfig
    path: Path
    sources: tuple[Source, ...]
    revision: str
    embedded: bool = False
    warnings: tuple[str, ...] = field(default_factory=tuple)


class DaemonEnv(BaseSettings):
    """`GPUD_*` environment variables that override [daemon] keys (the desired state does not)."""

    model_config = SettingsConfigDict(env_prefix="GPUD_", extra="ignore")

    listen: str | None = None
    state_dir: str | None = None
    runtime_dir: str | None = None
    timezone: str | None = None
    tick: str | None = None
    port_range: str | None = None
    admin_token_file: str | None = None
    log_level: str | None = None
    stop_engines_on_exit: bool | None = None


def key_path(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _read(path: Path) -> Source:
    try:
        text = decode(read_limited(path))
        deep = too_deep(text)
        if deep:
            raise ReadProblem(f"brackets nested more than {MAX_DEPTH} deep; gpud's keys are "
                              "never that deep", *deep)
    except ReadProblem as exc:
        raise ConfigError([ErrorItem(exc.message, file=str(path), line=exc.line,
                                     col=exc.col)]) from None
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError, RecursionError) as exc:
        # ValueError: an integer past Python's 4300-digit limit, raised by tomllib itself.
        msg = str(exc)
        line = col = 0
        if "(at line " in msg:
            head, _, tail = msg.rpartition(" (at line ")
            nums = tail.rstrip(")").split(", column ")
            if len(nums) == 2 and all(n.isdigit() for n in nums):
                line, col = int(nums[0]), int(nums[1])
                msg = head
        raise ConfigError(
            [ErrorItem(f"TOML syntax error: {msg}", file=str(path), line=line, col=col)]
        ) from None
    return Source(path, text, data)


def _merge(
    into: dict[str, Any], new: Mapping[str, Any], origin: dict[tuple[str, ...], Path],
    src: Path, prefix: tuple[str, ...], errors: list[ErrorItem],
) -> None:
    for key, value in new.items():
        here = (*prefix, key)
        if key not in into:
            into[key] = value
            origin[here] = src
        elif isinstance(into[key], dict) and isinstance(value, dict):
            _merge(into[key], value, origin, src, here, errors)
        elif isinstance(into[key], list) and isinstance(value, list) and all(
            isinstance(v, dict) for v in [*into[key], *value]
        ):
            into[key] = [*into[key], *value]  # [[schedule]] and [[auth.keys]] add up
        else:
            first = origin.get(here) or next(
                (origin[p] for p in sorted(origin, key=len, reverse=True) if here[: len(p)] == p),
                src,
            )
            errors.append(
                ErrorItem(
                    f"also set in {first}; a key may be set in one file only "
                    "(remove it from one of them)",
                    key=key_path(here),
                    file=str(src),
                )
            )


def _fields_at(loc: tuple[str | int, ...]) -> list[str]:
    """The keys allowed at a location, for "did you mean"."""
    tp: Any = GpudConfig
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if not isinstance(part, str) or part not in tp.model_fields:
                return []
            tp = tp.model_fields[part].annotation
            continue
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is dict and args:
            tp = args[1]
        elif origin is list and args:
            tp = args[0]
        else:
            return []
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return []


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0] if len(args) == 1 else tp
            if len(args) != 1:
                return tp
        else:
            return tp


def _message(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    loc = tuple(err["loc"])
    if kind == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        listing = f" Allowed here: {', '.join(allowed)}." if allowed and not guess else ""
        return f"unknown key{hint}{listing}".replace("key Allowed", "key. Allowed")
    if kind == "literal_error":
        return f"{err['msg'].replace('Input should be', 'must be')} (got {shown(err['input'])})"
    if kind == "missing":
        return "is required"
    if kind == "too_long":
        ctx = err.get("ctx", {})
        got = err.get("input")
        count = len(got) if isinstance(got, dict | list) else ctx.get("actual_length")
        return f"at most {ctx.get('max_length')} entries (got {count})"
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    msg = msg.replace("Input should be", "must be")
    if kind.endswith("_type") or kind.startswith(("greater", "less")):
        msg = f"{msg} (got {shown(err.get('input'))})"
    return msg


class _Located:
    """Locates errors; the texts are indexed only when there is an error to place."""

    def __init__(self, sources: Iterable[Source]) -> None:
        self.sources = list(sources)
        self._items: list[tuple[str, Locator]] | None = None

    @property
    def items(self) -> list[tuple[str, Locator]]:
        if self._items is None:
            self._items = [(str(s.path), Locator(s.text)) for s in self.sources]
        return self._items

    def error(self, loc: tuple[str | int, ...], message: str) -> ErrorItem:
        best: tuple[str, tuple[int, int], int] | None = None
        for name, locator in self.items:
            found = locator.find(loc)
            if found and (best is None or found[1] > best[2]):
                best = (name, found[0], found[1])
        if best is None:
            name = self.items[0][0] if self.items else ""
            return ErrorItem(message, key=key_path(loc), file=name)
        return ErrorItem(message, key=key_path(loc), file=best[0], line=best[1][0], col=best[1][1])


def _cross_check(cfg: GpudConfig, loc: _Located, check_files: bool) -> list[ErrorItem]:
    """What no single table can check: names, ports and aliases across models, references
    from profiles, the schedule and keys, and (check_files) secret files and sources."""
    errors = _check_models(cfg, loc) + _check_references(cfg, loc)
    if check_files:
        errors += _check_secret_files(cfg, loc) + _missing_sources(cfg, loc)
    return errors


def _check_models(cfg: GpudConfig, loc: _Located) -> list[ErrorItem]:
    errors: list[ErrorItem] = []
    names = set(cfg.models)
    ports: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, model in cfg.models.items():
        if model.engine not in cfg.engines:
            errors.append(loc.error(("models", name, "engine"),
                f"engine {model.engine!r} is not defined; "
                f"defined: {', '.join(sorted(cfg.engines))}"))
        if model.port is not None:
            if model.port in ports:
                errors.append(loc.error(("models", name, "port"),
                    f"port {model.port} is also used by model {ports[model.port]!r}"))
            ports[model.port] = name
            lo, hi = cfg.daemon.ports
            if lo <= model.port <= hi:
                errors.append(loc.error(("models", name, "port"),
                    f"port {model.port} is inside daemon.port_range {cfg.daemon.port_range}, "
                    "which gpud allocates from"))
        if model.port == cfg.daemon.port:
            errors.append(loc.error(("models", name, "port"),
                f"port {model.port} is gpud's own listener (daemon.listen)"))
        for i, alias in enumerate(model.aliases):
            other = aliases.get(alias) or (alias if alias in names else None)
            if other:
                errors.append(loc.error(("models", name, "aliases", i),
                    f"alias {alias!r} is already the name or alias of model {other!r}"))
            aliases[alias] = name
        errors += _check_args_env(loc, name, model.args, model.env)
    for kind, engine in cfg.engines.items():
        shape = command_problem(engine.command)
        if shape:
            errors.append(loc.error(("engines", kind, "command"), shape))
        for var in engine.env:
            if var in FORBIDDEN_ENV:
                errors.append(loc.error(("engines", kind, "env", var),
                    f"{var} is not allowed: gpud sets it itself for each model "
                    f"({FORBIDDEN_ENV[var]})"))
    return errors


def _check_args_env(loc: _Located, name: str, args: list[str],
                    env: dict[str, str]) -> list[ErrorItem]:
    errors: list[ErrorItem] = []
    for i, arg in enumerate(args):
        flag = option_name(arg)
        if flag in FORBIDDEN_ARGS:
            errors.append(loc.error(("models", name, "args", i),
                f"{flag} is not allowed in args: gpud sets it itself "
                f"({FORBIDDEN_ARGS[flag]})"))
    for var in env:
        if var in FORBIDDEN_ENV:
            errors.append(loc.error(("models", name, "env", var),
                f"{var} is not allowed: gpud sets it itself ({FORBIDDEN_ENV[var]})"))
    return errors


def _check_references(cfg: GpudConfig, loc: _Located) -> list[ErrorItem]:
    errors: list[ErrorItem] = []
    names = set(cfg.models)
    aliases = {a for m in cfg.models.values() for a in m.aliases}
    for profile, entries in cfg.profiles.items():
        for model_name in entries:
            if model_name not in names:
                guess = difflib.get_close_matches(model_name, names, n=1)
                hint = f"; did you mean {guess[0]!r}?" if guess else ""
                errors.append(loc.error(("profiles", profile, model_name),
                    f"model {model_name!r} is not defined under [models]{hint}"))
    for i, entry in enumerate(cfg.schedule):
        if entry.profile not in cfg.profiles:
            known = ", ".join(sorted(cfg.profiles)) or "none"
            errors.append(loc.error(("schedule", i, "profile"),
                f"profile {entry.profile!r} is not defined (defined profiles: {known})"))
    if cfg.schedule:
        from gpud.schedule import schedule_of

        sched = schedule_of(cfg.schedule, _zone(cfg.daemon.timezone))
        for problem in sched.overlaps() if sched else ():
            errors.append(loc.error(("schedule",), problem))
    for i, key in enumerate(cfg.auth.keys):
        for m in key.models or []:
            if m not in names and m not in aliases:
                errors.append(loc.error(("auth", "keys", i, "models"),
                    f"model {m!r} is not defined under [models]"))
    return errors


def _check_secret_files(cfg: GpudConfig, loc: _Located) -> list[ErrorItem]:
    errors: list[ErrorItem] = []
    for i, key in enumerate(cfg.auth.keys):
        if key.key_file is not None:
            key_problem = _secret_problem(key.key_file)
            if key_problem:
                errors.append(loc.error(("auth", "keys", i, "key_file"), key_problem))
    for path_loc, path in (
        (("auth", "admin_token_file"), cfg.auth.admin_token_file),
        (("daemon", "admin_token_file"), cfg.daemon.admin_token_file),
    ):
        if path is not None:
            file_problem = _secret_problem(path)
            if file_problem:
                errors.append(loc.error(path_loc, file_problem))
    return errors


def _missing_sources(cfg: GpudConfig, loc: _Located) -> list[ErrorItem]:
    """A local path that is not there would replace a working engine with a crash loop."""
    errors = []
    for name, model in cfg.models.items():
        if model.source.startswith(LOCAL_SOURCE):
            where = Path(model.source).expanduser()
            if not where.exists():
                errors.append(loc.error(("models", name, "source"),
                    f"{where} does not exist (a local source must; a Hugging Face id is "
                    "written ORG/NAME)"))
    return errors


def _secret_problem(path: Path) -> str | None:
    """secret_file_problem, and the file must hold something: an empty key matches nothing."""
    problem = secret_file_problem(path)
    if problem is not None:
        return problem
    try:
        if not decode(read_limited(path, 64 * 1024)).strip():
            return f"{path} is empty"
    except ReadProblem as exc:
        return f"{path} {exc.message}"
    return None


def secret_file_problem(path: Path) -> str | None:
    """Why a file holding a secret must not be trusted, or None when it is fine."""
    try:
        st = path.stat()
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_mode & 0o077:
        return (f"{path} is readable or writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}")
    if st.st_uid not in (0, os.geteuid()):
        return f"{path} is owned by uid {st.st_uid}, not root or gpud's user"
    return None


def _zone(name: str | None) -> Any:
    from zoneinfo import ZoneInfo

    if name:
        return ZoneInfo(name)
    try:
        return ZoneInfo(os.environ.get("TZ") or _system_zone())
    except Exception:
        return ZoneInfo("UTC")


def _system_zone() -> str:
    try:
        target = os.readlink("/etc/localtime")
        return target.split("zoneinfo/", 1)[1]
    except (OSError, IndexError):
        return "UTC"


def zone_of(cfg: GpudConfig) -> Any:
    """The schedule's time zone: [daemon] timezone, else the system's."""
    return _zone(cfg.daemon.timezone)


def dropin_files(path: Path) -> list[Path]:
    d = path.parent / (path.stem + ".d")
    if not d.is_dir():
        return []
    # A FIFO or device is listed so that reading it is refused by name, not skipped; a
    # dangling symlink (an editor's lock file) is not a drop-in.
    return sorted(p for p in d.iterdir() if p.suffix == ".toml" and p.exists()
                  and not p.is_dir())


def load_config(
    path: Path | None = None, *, check_files: bool = True
) -> LoadedConfig:
    """Read, merge, validate and cross-check; raise ConfigError with every problem located.

    Never raises anything else: every reload path (watcher, SIGHUP, the API, `gpud check`)
    relies on that to report a bad file instead of dying on it.
    """
    try:
        return _load(path, check_files)
    except ConfigError:
        raise
    except Exception as exc:  # a value nobody bounded yet: refused and reported, never a crash
        log.debug("config load failed unexpectedly", exc_info=True)
        text = str(exc)
        text = text if len(text) <= 300 else text[:299] + "…"
        raise ConfigError([ErrorItem(f"cannot be checked ({type(exc).__name__}: {text})",
                                     file=str(path or DEFAULT_PATH))]) from exc


def _load(path: Path | None, check_files: bool) -> LoadedConfig:
    embedded = False
    if path is None:
        path = DEFAULT_PATH
        if not path.exists():
            path, embedded = EMBEDDED_DEFAULT, True
    files = [path, *([] if embedded else dropin_files(path))]
    if len(files) > MAX_ENTRIES:
        raise ConfigError([ErrorItem(f"{len(files) - 1} drop-in files; at most "
                                     f"{MAX_ENTRIES - 1} are read", file=str(files[1].parent))])
    sources = [_read(p) for p in files]
    _refuse_empty_and_deep(sources)
    located = _Located(sources)
    merged: dict[str, Any] = {}
    origin: dict[tuple[str, ...], Path] = {}
    errors: list[ErrorItem] = []
    for src in sources:
        _merge(merged, src.data, origin, src.path, (), errors)
    for i, e in enumerate(errors):
        parts = tuple(e.key.split("."))
        for s in sources:
            if str(s.path) == e.file:
                found = Locator(s.text).find(parts)
                if found:
                    errors[i] = ErrorItem(e.message, e.key, e.file, *found[0])
    if errors:
        raise ConfigError(errors)
    overrides = _env_overrides()
    if overrides:
        merged["daemon"] = {**merged.get("daemon", {}), **overrides}
    try:
        cfg = GpudConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(
            [located.error(tuple(err["loc"]), _message(err)) for err in exc.errors()]
        ) from None
    errors = _cross_check(cfg, located, check_files)
    if errors:
        raise ConfigError(errors)
    digest = hashlib.sha256()
    for src in sources:
        digest.update(src.path.name.encode() + b"\0" + src.text.encode() + b"\0")
    return LoadedConfig(cfg, path, tuple(sources), digest.hexdigest()[:12], embedded)


def _refuse_empty_and_deep(sources: list[Source]) -> None:
    empty = [s for s in sources if not s.data]
    if empty:
        raise EmptyConfigError([ErrorItem(
            f"declares nothing ({len(s.text.encode())} bytes, no keys): refused, as a file "
            "caught mid-save would unload every model; to run with no models on purpose, "
            "write `models = {}`", file=str(s.path)) for s in empty])
    for s in sources:
        depth, where = deepest(s.data)
        if depth > MAX_DEPTH:
            err = _Located([s]).error(
                where, f"nested {depth} levels deep; gpud's keys are at most {MAX_DEPTH}")
            raise ConfigError([replace(err, key=key_path(where[: MAX_DEPTH + 1]) + "…")])


def _env_overrides() -> dict[str, Any]:
    return DaemonEnv().model_dump(exclude_none=True)
