"""The desired-state file: located errors for people, drop-ins, env overrides, the shipped file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpud.config import ConfigError, load_config
from gpud.config.units import format_duration, format_size, parse_duration, parse_size

ROOT = Path(__file__).resolve().parent.parent
BAD = sorted((ROOT / "tests/data/bad").glob("*.toml"))


def gpud(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpud.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_broken_file_names_file_line_col_and_key(path: Path) -> None:
    expect = path.read_text().splitlines()[0].removeprefix("# expect: ")
    where, _, words = expect.partition(" | ")
    pos, _, key = where.partition(" ")
    result = gpud("check", str(path.relative_to(ROOT)))
    assert result.returncode == 1, result.stdout
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"{path.relative_to(ROOT)}:{pos}:"), first
    if key:
        assert f" {key}: " in first, first
    assert words in first, first


def test_at_least_ten_broken_files() -> None:
    assert len(BAD) >= 10


def test_shipped_file_is_valid() -> None:
    result = gpud("check", "etc/gpud/gpud.toml")
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_dropins_merge_in_name_order_and_conflicts_are_errors(tmp_path: Path) -> None:
    main = tmp_path / "gpud.toml"
    main.write_text('[models.chat]\nsource = "m/chat"\n')
    d = tmp_path / "gpud.d"
    d.mkdir()
    (d / "10-batch.toml").write_text('[models.batch]\nsource = "m/batch"\nstate = "asleep"\n')
    (d / "20-sched.toml").write_text(
        '[profiles.night]\nbatch = "awake"\n[[schedule]]\nprofile = "night"\n'
        'when = "22:00-06:00"\n')
    loaded = load_config(main)
    assert set(loaded.config.models) == {"chat", "batch"}
    assert [s.path.name for s in loaded.sources] == ["gpud.toml", "10-batch.toml", "20-sched.toml"]
    (d / "30-conflict.toml").write_text('[models.chat]\n\nsource = "org/elsewhere"\n')
    with pytest.raises(ConfigError) as err:
        load_config(main)
    msg = str(err.value)
    assert "30-conflict.toml:3:1: models.chat.source: also set in" in msg
    assert "gpud.toml" in msg


def test_env_overrides_daemon_settings_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gpud.toml"
    path.write_text('[daemon]\nlisten = "127.0.0.1:8080"\n')
    monkeypatch.setenv("GPUD_LISTEN", "127.0.0.1:9999")
    monkeypatch.setenv("GPUD_MODELS", "ignored")  # the desired state comes from files only
    cfg = load_config(path).config
    assert cfg.daemon.listen == "127.0.0.1:9999"
    assert cfg.models == {}


def test_identical_file_same_revision(tmp_path: Path) -> None:
    path = tmp_path / "gpud.toml"
    path.write_text('[models.chat]\nsource = "m/chat"\n')
    a = load_config(path).revision
    path.write_text('[models.chat]\nsource = "m/chat"\n')
    assert load_config(path).revision == a
    path.write_text('[models.chat]\nsource = "m/chat2"\n')
    assert load_config(path).revision != a


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "support.key"
    key.write_text("sk-secret\n")
    os.chmod(key, 0o644)
    path = tmp_path / "gpud.toml"
    path.write_text(f'[models.chat]\nsource = "org/m"\n\n[[auth.keys]]\nname = "support"\n'
                    f'key_file = "{key}"\nmodels = ["chat"]\n')
    result = gpud("check", str(path))
    assert result.returncode == 1
    assert f"{path}:6:1: auth.keys[0].key_file:" in result.stderr
    assert "chmod 600" in result.stderr
    os.chmod(key, 0o600)
    assert gpud("check", str(path)).returncode == 0


def test_every_error_is_reported_not_just_the_first(tmp_path: Path) -> None:
    path = tmp_path / "gpud.toml"
    path.write_text('[models.a]\nsource = "org/m"\nstate = "x"\nprority = 3\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    keys = {e.key for e in err.value.errors}
    assert keys == {"models.a.state", "models.a.prority"}


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("15m", 900), ("1h30m", 5400), ("500ms", 0.5), ("2d", 172800), (5, 5),
])
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds
    assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)


@pytest.mark.parametrize(("text", "size"), [
    ("8GiB", 8 * 2**30), ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("1.5GiB", 3 * 2**29),
    (4096, 4096),
])
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size
    assert parse_size(format_size(size)) == size


@pytest.mark.parametrize("bad", ["8 gigs", "-1", "GiB", "", True])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)
