"""The daemon's KV pool follows the config: built at start, kept in step on every reload."""

from __future__ import annotations

from pathlib import Path

from gpud.config import load_config
from gpud.kvpool.setup import build_server, sync_server

BASE = """
[daemon]
listen = "127.0.0.1:18990"
state_dir = "{root}/state"
runtime_dir = "{root}/run"

[engines.vllm]
command = ["/nonexistent/vllm", "serve"]

[models.chat]
source = "m/chat"
gpu = 0
kv_min = "32MiB"
kv_max = "64MiB"
priority = {priority}
{extra}
"""

CODE = """
[models.code]
source = "m/code"
gpu = 0
kv_pool = true
"""


def cfg(tmp_path: Path, priority: int = 10, extra: str = ""):  # type: ignore[no-untyped-def]
    path = tmp_path / "gpud.toml"
    path.write_text(BASE.format(root=tmp_path, priority=priority, extra=extra))
    return load_config(path).config


def test_a_pool_model_added_on_reload_joins_the_pool_with_its_share(tmp_path: Path) -> None:
    server = build_server(cfg(tmp_path), tmp_path / "run", lambda peer, model: True)
    assert server is not None
    ledger = server.pools[0].ledger
    assert ledger.total_pages == 32 and ledger.tenants() == ["chat"]
    assert ledger.spec("chat").kv_min == 16

    # A reload adds `code` (kv_pool = true: 4 GiB, the engine's default virtual size) and
    # changes chat's priority: both apply, nothing else moves.
    assert sync_server(server, cfg(tmp_path, priority=50, extra=CODE)) == []
    assert sorted(ledger.tenants()) == ["chat", "code"]
    assert ledger.total_pages == 32 + 2048
    assert ledger.spec("chat").priority == 50
    assert ledger.spec("code").kv_max is None and ledger.spec("code").kv_min == 0
    ledger.check()

    # The same config again changes nothing.
    assert sync_server(server, cfg(tmp_path, priority=50, extra=CODE)) == []
    assert ledger.total_pages == 32 + 2048


def test_no_pool_model_no_pool(tmp_path: Path) -> None:
    plain = cfg(tmp_path).model_copy(update={"models": {}})
    assert build_server(plain, tmp_path / "run", lambda peer, model: True) is None
