"""Issue 21 items 1, 2 and 8, live: a running gpud refuses hostile edits and keeps watching.

A real `gpud run` on a loopback port with models that start no engine; every check polls the
API (revision, valid, error) against a deadline, never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.error
from pathlib import Path
from typing import Any

import pytest
from gpudproc import Gpud, free_port, wait_for

CONFIG = """[daemon]
listen = "127.0.0.1:{port}"
state_dir = "{tmp}/state"
runtime_dir = "{tmp}/run"

[engines.vllm]
command = ["/nonexistent/vllm", "serve"]

[models.chat]
source = "org/chat"
state = "unloaded"

[models.batch]
source = "org/batch"
state = "unloaded"
"""


@pytest.fixture
def daemon(tmp_path: Path) -> Any:
    port = free_port()
    cfg = tmp_path / "etc" / "gpud.toml"
    cfg.parent.mkdir()
    cfg.write_text(CONFIG.format(port=port, tmp=tmp_path))
    g = Gpud(cfg, port, log=tmp_path / "gpud.log").start()
    yield g
    assert g.stop() == 0


def config(g: Gpud) -> dict[str, Any]:
    return g.status()["config"]  # type: ignore[no-any-return]


def refused(g: Gpud, words: str) -> dict[str, Any]:
    return wait_for(lambda: (c := config(g))["valid"] is False and words in c["error"] and c,
                    5.0, f"the reload to be refused with {words!r}")  # type: ignore[no-any-return]


def api_reload(g: Gpud) -> tuple[int, dict[str, Any]]:
    """POST /api/v1/reload: the status code (422 when refused) and the JSON answer."""
    try:
        return 200, g.request("POST", "/api/v1/reload", {}, timeout=10)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def applied(g: Gpud, old: str) -> str:
    return wait_for(lambda: (c := config(g))["valid"] and c["revision"] != old
                    and c["revision"], 2.0, "a valid edit to be applied")  # type: ignore[no-any-return]


def test_an_overflowing_tick_is_refused_and_the_watcher_keeps_going(daemon: Gpud) -> None:
    good = config(daemon)["revision"]
    text = daemon.config.read_text()
    daemon.config.write_text(text.replace("[daemon]\n", '[daemon]\ntick = "99999999999d"\n'))
    cfg = refused(daemon, "daemon.tick:")
    assert cfg["revision"] == good
    assert "gpud.toml:2:1: daemon.tick: '99999999999d' is longer than 366d" in cfg["error"]
    # The API path answers with the refusal (it was a 500), then a valid edit is applied.
    daemon.config.write_text(text.replace("[daemon]\n", "[daemon]\ntick = inf\n"))
    code, result = api_reload(daemon)
    assert code == 422 and "not a finite duration" in result["error"]
    daemon.config.write_text(text + "# fixed\n")
    applied(daemon, good)


def test_deep_nesting_and_sighup_are_refused_with_a_reason(daemon: Gpud) -> None:
    good = config(daemon)["revision"]
    text = daemon.config.read_text()
    daemon.config.write_text(text + "x = " + "{a = " * 2000 + "1" + "}" * 2000 + "\n")
    refused(daemon, "nested more than 16 deep")
    assert daemon.proc is not None
    os.kill(daemon.proc.pid, signal.SIGHUP)
    wait_for(lambda: "refused" in daemon.log_text().split("SIGHUP", 1)[-1], 5.0,
             "the SIGHUP reload's refusal in the log")
    daemon.config.write_text(text + "# fixed\n")
    applied(daemon, good)
    assert "Traceback" not in daemon.log_text()


def test_truncate_then_write_never_unloads(daemon: Gpud) -> None:
    """An editor's truncate, a pause, the same content: gpud applied the empty file."""
    good = config(daemon)["revision"]
    text = daemon.config.read_text()
    with daemon.config.open("r+") as f:
        f.truncate(0)
    cfg = refused(daemon, "declares nothing (0 bytes")
    assert cfg["revision"] == good
    assert set(daemon.models()) == {"chat", "batch"}
    daemon.config.write_text(text)
    wait_for(lambda: config(daemon)["valid"], 2.0, "the same file to be valid again")
    assert config(daemon)["revision"] == good
    applied_revisions = {e.get("revision") for e in daemon.events()
                         if e["kind"] == "config" and e.get("valid")}
    assert applied_revisions <= {good}
    assert re.search(r"WARNING gpud.daemon: config reload \(file change\) refused; still running "
                     r"revision \w+:\n.*: declares nothing", daemon.log_text())


def test_models_removed_by_a_reload_are_logged(daemon: Gpud) -> None:
    good = config(daemon)["revision"]
    text = daemon.config.read_text()
    daemon.config.write_text(text.split("[models.batch]")[0])
    applied(daemon, good)
    assert "model 'batch' removed from the file: its engines stop" in daemon.log_text()


def test_a_fifo_or_dev_zero_never_blocks_a_reload(daemon: Gpud, tmp_path: Path) -> None:
    good = config(daemon)["revision"]
    text = daemon.config.read_text()
    fifo = tmp_path / "etc" / "pipe"
    os.mkfifo(fifo)
    os.replace(fifo, daemon.config)
    code, result = api_reload(daemon)
    assert code == 422 and "is a FIFO" in result["error"]
    daemon.config.unlink()
    daemon.config.symlink_to("/dev/zero")
    code, result = api_reload(daemon)
    assert code == 422 and "is a character device" in result["error"]
    assert config(daemon)["revision"] == good
    daemon.config.unlink()
    daemon.config.write_text(text + "# fixed\n")
    applied(daemon, good)  # the reload lock was never held
