"""Follow the config file and its drop-ins (`gpud.d/*.toml`) and reload on every change.

The file's directory is watched, not the file (editors save by renaming a new file over
it), and `gpud.d/` from its parent too, so a drop-in dir created (or removed) after start
is picked up: the watch is set up again with or without it. This module never parses a
config; `reload` does, and refuses what is invalid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("gpud.daemon")


async def watch_config(path: Path, reload: Callable[[], Awaitable[Any]], stop: asyncio.Event,
                       ready: asyncio.Event) -> None:
    """Call `reload` after each change until `stop` is set; `ready` once the first watch
    exists (every edit from then on is seen)."""
    import watchfiles

    path = path.resolve()
    dropins = path.parent / (path.stem + ".d")
    logging.getLogger("watchfiles").setLevel(logging.WARNING)

    def relevant(_: object, changed: str) -> bool:
        p = Path(changed)
        return p in (path, dropins) or (p.parent == dropins and p.suffix == ".toml")

    while not stop.is_set():
        dirs = [path.parent, *([dropins] if dropins.is_dir() else [])]
        changes = watchfiles.awatch(*dirs, debounce=30, step=10, stop_event=stop,
                                    recursive=False, watch_filter=relevant)
        nxt = asyncio.ensure_future(anext(changes))
        try:
            # One loop turn runs awatch up to its first await: the inotify watches exist now.
            await asyncio.sleep(0)
            ready.set()
            # An edit made before this watch existed (since the first load, or in a new
            # gpud.d/ before it was watched) had no watch to see it.
            await reload()
            while True:
                await nxt
                await reload()
                if dropins.is_dir() != (dropins in dirs):
                    log.info("%s %s: watching again", dropins,
                             "appeared" if dropins.is_dir() else "is gone")
                    break
                nxt = asyncio.ensure_future(anext(changes))
        except StopAsyncIteration:
            return
        finally:
            # Awaited, not only cancelled: nothing of the watch outlives its task.
            nxt.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await nxt
        await changes.aclose()
