"""`Daemon.serve` in uvicorn's shape: what start-up started, the exit stack stops, in
reverse order, also when start-up fails half-way (here: the port is taken)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from test_api_routes import CONFIG

from gpud.config import load_config
from gpud.daemon import Daemon


async def test_a_taken_port_exits_1_and_leaves_nothing_running(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        path = tmp_path / "gpud.toml"
        path.write_text(CONFIG.format(port=taken.getsockname()[1], tmp=tmp_path))
        daemon = Daemon(load_config(path), path, stop_engines_on_exit=True)
        before = asyncio.all_tasks()
        assert await asyncio.wait_for(daemon.serve(), 30) == 1
    left = [t for t in asyncio.all_tasks() - before if not t.done()]
    assert left == [], f"still running after a failed start-up: {left}"
    assert daemon._bg["watch"].cancelled() or daemon._bg["watch"].done()


async def test_a_clean_stop_stops_in_reverse_order_of_start(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "gpud.toml"
    path.write_text(CONFIG.format(port=port, tmp=tmp_path))
    daemon = Daemon(load_config(path), path, stop_engines_on_exit=True)
    order: list[str] = []

    def spy(owner: object, name: str, label: str) -> None:
        fn = getattr(owner, name)

        async def wrapped(*a: object) -> None:
            order.append(label)
            r = fn(*a)
            if asyncio.iscoroutine(r):
                await r

        setattr(owner, name, wrapped)

    spy(daemon.kv, "close", "kv.close")
    for name in ("_stop_engines", "_cancel_background"):
        spy(daemon, name, name)
    ready = asyncio.Event()
    announce = daemon.notifier.ready

    def on_ready() -> None:
        announce()
        ready.set()

    daemon.notifier.ready = on_ready  # type: ignore[method-assign]
    task = asyncio.create_task(daemon.serve())
    await asyncio.wait_for(ready.wait(), 30)
    daemon.request_stop()
    assert await asyncio.wait_for(task, 30) == 0
    assert order == ["_cancel_background", "_stop_engines", "kv.close"]
    assert all(t.done() for t in daemon._bg.values())
