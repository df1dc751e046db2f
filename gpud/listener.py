"""A live `daemon.listen` change: gpud moves its listener without a restart.

The new address is bound before the old one is closed, so a refused move (the port is
taken, the address is not on this host) leaves gpud serving where it was; the reason is
logged and shown in status. A move between hosts on one port has to close the old socket
first, and opens it again when the new one fails. Open connections finish on the old
socket. This module never touches the app, only its sites.
"""

from __future__ import annotations

import logging

from aiohttp import web

log = logging.getLogger("gpud.daemon")


def split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


async def _open(runner: web.AppRunner, listen: str) -> web.TCPSite:
    host, port = split(listen)
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    return site


async def rebind(runner: web.AppRunner, site: web.TCPSite, old: str,
                 new: str) -> tuple[web.TCPSite, str | None]:
    """(the site now listening, None) after a move to `new`; (`site`, why) when refused."""
    same_port = split(old)[1] == split(new)[1]
    try:
        moved = await _open(runner, new)
    except OSError as exc:
        if not same_port:
            return site, f"cannot listen on {new}: {exc.strerror or exc}"
    else:
        await site.stop()
        log.info("now listening on http://%s (was %s)", new, old)
        return moved, None
    await site.stop()  # same port on another host: the old socket holds it
    try:
        moved = await _open(runner, new)
    except OSError as exc:
        why = f"cannot listen on {new}: {exc.strerror or exc}"
        return await _open(runner, old), why
    log.info("now listening on http://%s (was %s)", new, old)
    return moved, None
