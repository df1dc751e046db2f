"""The package upgrade hand-off: gpud is replaced, its engines are not.

A package upgrade restarts gpud (the new code must run). A clean stop takes the engines down
(`stop_engines_on_exit`), so without this every model would reload, minutes on a GPU. The
package's postinst therefore writes MARKER in gpud's runtime directory just before it
restarts gpud: the gpud that stops finds it, leaves its engines running (as after a crash)
and the new gpud adopts them. The marker counts for that one stop only: the stopping gpud
removes it, and a gpud that starts removes one left over (a restart that never stopped a
gpud), so a later `systemctl stop` stops the engines again.

Never stops or starts anything itself; `keep_engines_on_upgrade = false` in [daemon] makes
an upgrade stop the engines like any other stop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpud.config.schema import DaemonConfig

log = logging.getLogger("gpud.upgrade")

# packaging/debian/gpud.postinst writes this name; keep the two in step
MARKER = "keep-engines-once"


def marker_dirs(runtime_dir: Path) -> list[Path]:
    """Where the marker may be: gpud's runtime_dir and the unit's RuntimeDirectory=
    ($RUNTIME_DIRECTORY, /run/gpud), which the package knows without reading the config."""
    dirs = [runtime_dir]
    for raw in os.environ.get("RUNTIME_DIRECTORY", "").split(":"):
        if raw and Path(raw) not in dirs:
            dirs.append(Path(raw))
    return dirs


def take_marker(dirs: Iterable[Path]) -> str | None:
    """The marker's text (who asked, e.g. "gpud 0.1.0 -> 0.1.1"), removing the file; None
    when no directory has one."""
    found: str | None = None
    for d in dirs:
        path = d / MARKER
        try:
            text = path.read_text(errors="replace").strip()[:200]
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:  # unreadable or not removable: say so, do not keep engines
            log.warning("cannot take the upgrade marker %s: %s", path, exc.strerror)
            continue
        found = found or text or "a package upgrade"
    return found


def clear_left_over(runtime_dir: Path) -> None:
    """At start: a marker here is from a restart that stopped no gpud (or an older gpud that
    ignored it); it must not keep the engines on some later stop."""
    left = take_marker(marker_dirs(runtime_dir))
    if left:
        log.info("removed an unused upgrade marker (%s)", left)


def keeps_engines(daemon: DaemonConfig, runtime_dir: Path) -> str | None:
    """At a clean stop: why this one keeps the engines (the package's marker, taken), or
    None; says so in the log. With stop_engines_on_exit = false they stay anyway."""
    why = take_marker(marker_dirs(runtime_dir))
    if not why:
        return None
    if not daemon.keep_engines_on_upgrade:
        log.info("%s: keep_engines_on_upgrade = false, so the engines stop too", why)
        return None
    log.info("stopping for %s: engines keep running; the new gpud adopts them", why)
    return why
