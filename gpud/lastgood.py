"""The last good config: a copy of the files gpud last ran on, kept in the state dir.

Written after every accepted load (`STATE/last-good/gpud.toml` and `gpud.d/*.toml`, the
same names, so it loads to the same revision); read at start-up only, when the file is
invalid: a crash plus a bad edit must not leave engines unsupervised. It is never
preferred over a valid file, and never used for a file other than the one it copies.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tomllib
from pathlib import Path

from gpud.config import ConfigError, LoadedConfig, load_config
from gpud.config.schema import DaemonConfig

log = logging.getLogger("gpud.daemon")

LAST_GOOD = "last-good"
SOURCE = "SOURCE"  # the path of the file it copies


def state_fallback() -> Path:
    """Where gpud keeps its state when the configured state dir is not writable."""
    home = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state"))
    return home / "gpud"


def save(state_dir: Path, loaded: LoadedConfig) -> None:
    """Replace the copy with `loaded`'s files, atomically (a rename of a whole dir)."""
    dest = state_dir / LAST_GOOD
    tmp = state_dir / (LAST_GOOD + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    main, *dropins = loaded.sources
    (tmp / main.path.name).write_text(main.text)
    if dropins:
        (tmp / (main.path.stem + ".d")).mkdir()
    for src in dropins:
        (tmp / (main.path.stem + ".d") / src.path.name).write_text(src.text)
    (tmp / SOURCE).write_text(str(loaded.path.resolve()) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _state_dirs(path: Path) -> list[Path]:
    """Where the state dir may be when the file cannot be validated: the environment's
    override, else what the file says if it parses at all, else the default; and the
    fallback gpud uses when that is not writable."""
    configured = os.environ.get("GPUD_STATE_DIR")
    if configured is None:
        try:
            daemon = tomllib.loads(path.read_text()).get("daemon", {})
            value = daemon.get("state_dir") if isinstance(daemon, dict) else None
            configured = value if isinstance(value, str) else None
        except (OSError, ValueError):  # unreadable, not UTF-8, not TOML
            configured = None
    first = Path(configured) if configured else DaemonConfig().state_dir
    return [first, state_fallback()]


def load_for(path: Path, error: ConfigError) -> tuple[LoadedConfig, str] | None:
    """The last good copy of `path` and a sentence saying why gpud runs on it, or None
    when there is no usable copy (then the caller exits with `error`)."""
    for state_dir in _state_dirs(path):
        copy = state_dir / LAST_GOOD
        try:
            source = (copy / SOURCE).read_text().strip()
        except OSError:
            continue
        if source != str(path.resolve()):
            log.info("%s copies %s, not %s: not used", copy, source, path)
            continue
        try:
            loaded = load_config(copy / path.name)
        except ConfigError as exc:
            log.warning("the last good config in %s does not load either:\n%s", copy, exc)
            continue
        why = (f"{path} is invalid; running on the last good config (revision "
               f"{loaded.revision}, kept in {copy}) until the file is fixed:\n{error}")
        # Watch and report the operator's file; the sources still say where the text is.
        return dataclasses.replace(loaded, path=path), why
    return None
