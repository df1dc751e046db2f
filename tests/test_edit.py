"""`gpud set` / `gpud unset` on the shipped, heavily commented config: one line changes.

Fast and real: the real CLI entry point on a copy of etc/gpud/gpud.toml in a temp dir; no
daemon answers (the port in the copy is closed), which `set` reports and still exits 0.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from gpud.cli import main
from gpud.config import load_config
from gpud.config.edit import EditError, parse_key, parse_value, set_key

SHIPPED = Path(__file__).resolve().parent.parent / "etc" / "gpud" / "gpud.toml"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The shipped file, with directories this test may use and a port nobody listens on."""
    text = SHIPPED.read_text()
    text = text.replace('state_dir = "/var/lib/gpud"', f'state_dir = "{tmp_path / "state"}"')
    text = text.replace('runtime_dir = "/run/gpud"', f'runtime_dir = "{tmp_path / "run"}"')
    text = text.replace('listen = "127.0.0.1:8080"', f'listen = "127.0.0.1:{_closed_port()}"')
    path = tmp_path / "gpud.toml"
    path.write_text(text)
    path.chmod(0o640)
    monkeypatch.delenv("GPUD_CONFIG", raising=False)
    monkeypatch.delenv("GPUD_URL", raising=False)
    load_config(path)  # the starting point is valid
    return path


def _changed_lines(before: bytes, after: bytes) -> list[tuple[int, bytes, bytes]]:
    a, b = before.split(b"\n"), after.split(b"\n")
    assert len(a) == len(b), "lines were added or removed"
    return [(i + 1, x, y) for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]


def test_set_changes_exactly_one_line(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = conf.read_bytes()
    assert main(["set", "--file", str(conf), "daemon.tick", "5s"]) == 0
    after = conf.read_bytes()
    changed = _changed_lines(before, after)
    assert changed == [(changed[0][0], b'tick = "2s"', b'tick = "5s"')]
    # every comment and blank line is where it was
    assert before.count(b"\n#") == after.count(b"\n#")
    assert before.replace(b'tick = "2s"', b'tick = "5s"') == after
    assert stat.S_IMODE(conf.stat().st_mode) == 0o640
    assert load_config(conf).config.daemon.tick.total_seconds() == 5
    out = capsys.readouterr().out
    assert '-tick = "2s"' in out and '+tick = "5s"' in out  # the diff is shown
    assert "no daemon answered" in out  # and the missing daemon is reported, exit 0


def test_set_keeps_a_trailing_comment(conf: Path) -> None:
    text = conf.read_text().replace('log_level = "info"', 'log_level = "info"  # for now')
    conf.write_text(text)
    assert main(["set", "--file", str(conf), "--no-reload", "daemon.log_level", "debug"]) == 0
    assert conf.read_text() == text.replace('log_level = "info"  # for now',
                                            'log_level = "debug"  # for now')


def test_invalid_value_is_refused_and_the_file_is_untouched(
        conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = conf.read_bytes()
    mtime = conf.stat().st_mtime_ns
    assert main(["set", "--file", str(conf), "daemon.log_level", "loud"]) == 1
    assert conf.read_bytes() == before
    assert conf.stat().st_mtime_ns == mtime
    err = capsys.readouterr().err
    line = before.split(b"\n").index(b'log_level = "info"') + 1
    # located in the real file, at the line of the key, with what is allowed
    assert f"{conf}:{line}:" in err
    assert "daemon.log_level" in err and "'debug'" in err
    assert not [p for p in conf.parent.iterdir() if p.name.startswith(".gpud.toml.")]


def test_unknown_key_is_refused_with_a_suggestion(
        conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = conf.read_bytes()
    assert main(["set", "--file", str(conf), "daemon.tik", "5s"]) == 1
    assert conf.read_bytes() == before
    assert "did you mean 'tick'" in capsys.readouterr().err


def test_unset_removes_one_line(conf: Path) -> None:
    before = conf.read_bytes()
    assert main(["unset", "--file", str(conf), "--no-reload", "daemon.port_range"]) == 0
    after = conf.read_bytes()
    assert before.replace(b'port_range = "18000-18999"\n', b"") == after
    assert main(["unset", "--file", str(conf), "daemon.port_range"]) == 1  # nothing to unset


def test_new_model_and_inline_table_edits(conf: Path) -> None:
    assert main(["set", "--file", str(conf), "--no-reload", "models.chat.source", "m/chat"]) == 0
    assert main(["set", "--file", str(conf), "--no-reload", "models.chat.state", "asleep"]) == 0
    assert main(["set", "--file", str(conf), "--no-reload", "profiles.day.chat",
                 '{ state = "awake", replicas = 2 }']) == 0
    assert main(["set", "--file", str(conf), "--no-reload", "profiles.day.chat.replicas",
                 "3"]) == 0
    cfg = load_config(conf).config
    assert cfg.models["chat"].state == "asleep"
    assert cfg.profiles["day"]["chat"].replicas == 3
    assert conf.read_text().startswith(SHIPPED.read_text().split("\n[daemon]")[0])


def test_dry_run_writes_nothing(conf: Path) -> None:
    before = conf.read_bytes()
    assert main(["set", "--file", str(conf), "--dry-run", "daemon.tick", "9s"]) == 0
    assert conf.read_bytes() == before


def test_keys_and_values() -> None:
    assert parse_key("models.chat.state") == ["models", "chat", "state"]
    assert parse_key('models."qwen2.5".state') == ["models", "qwen2.5", "state"]
    assert parse_key("schedule.0.when") == ["schedule", "0", "when"]
    with pytest.raises(EditError):
        parse_key("models..state")
    assert parse_value("asleep") == "asleep"
    assert parse_value("8GiB") == "8GiB"
    assert parse_value("2") == 2 and parse_value("true") is True
    assert parse_value('["--a", "--b"]') == ["--a", "--b"]
    text = '[[schedule]]\nprofile = "day"\nwhen = "08:00-20:00"  # office\n'
    assert set_key(text, "schedule.0.when", "otherwise") == text.replace(
        '"08:00-20:00"', '"otherwise"')


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another owner needs root")
def test_owner_is_kept(conf: Path) -> None:
    os.chown(conf, 4242, 4343)
    assert main(["set", "--file", str(conf), "--no-reload", "daemon.tick", "3s"]) == 0
    st = conf.stat()
    assert (st.st_uid, st.st_gid) == (4242, 4343)
