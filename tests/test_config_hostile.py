"""Issue 21 items 1, 2, 8, 13: hostile config files get a located error, never a traceback.

Each case is a file an adversarial sweep of `gpud check` broke: a traceback, a value accepted
that breaks at runtime, a read that blocks or never ends. The property at the end: no TOML
built from gpud's own keys and hostile values makes `gpud check` print a traceback.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpud.cli import main
from gpud.config import ConfigError, load_config
from gpud.proxy.auth import ApiKey, KeyRing, hash_key

MAX_MODELS = 256  # the promise: more models than this are refused
ROOT = Path(__file__).resolve().parent.parent


def check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`gpud check PATH` in-process: exit code and stderr."""
    try:
        code = main(["check", str(path)])
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def check_subprocess(path: Path) -> subprocess.CompletedProcess[str]:
    """`gpud check PATH` as a process, for files that could block the caller forever."""
    return subprocess.run([sys.executable, "-m", "gpud.cli", "check", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=20)


DEEP = "x = " + "{a = " * 2000 + "1" + "}" * 2000 + "\n"

# name, file text, the first error line's "LINE:COL: KEY:" and words in it
REFUSED = [
    ("tick-huge-days", '[daemon]\ntick = "99999999999d"\n', "2:1: daemon.tick:", "longer than"),
    ("tick-1e300", "[daemon]\ntick = 1e300\n", "2:1: daemon.tick:", "longer than"),
    ("tick-inf", "[daemon]\ntick = inf\n", "2:1: daemon.tick:", "not a finite duration"),
    ("tick-nan", "[daemon]\ntick = nan\n", "2:1: daemon.tick:", "not a finite duration"),
    ("tick-zero", '[daemon]\ntick = "0s"\n', "2:1: daemon.tick:", "at least 100ms"),
    ("tick-huge-int", "[daemon]\ntick = " + "9" * 400 + "\n", "2:1: daemon.tick:",
     "longer than"),
    ("tick-digits", '[daemon]\ntick = "' + "9" * 400 + 's"\n', "2:1: daemon.tick:",
     "not a finite"),
    ("health-zero", '[engines.vllm]\nhealth_interval = "0s"\n',
     "2:1: engines.vllm.health_interval:", "at least 100ms"),
    ("policy-interval-zero", '[policies]\ninterval = 0\n', "2:1: policies.interval:",
     "at least 100ms"),
    ("nested-2000", DEEP, "1:", "nested more than 16 deep"),
    ("dotted-3000", "[a" + ".b" * 3000 + "]\nx = 1\n", "1:1: a.b.b", "nested 3001 levels"),
    ("max-model-len", '[models.a]\nsource = "org/a"\nmax_model_len = 100000000000000000000000\n',
     "3:1: models.a.max_model_len:", "less than or equal to 100000000"),
    ("size-huge", '[models.a]\nsource = "org/a"\nkv_cache = "99999999TiB"\n',
     "3:1: models.a.kv_cache:", "larger than 1024TiB"),
    ("gpu-index", '[models.a]\nsource = "org/a"\ngpu = 100000\n', "3:1: models.a.gpu:",
     "less than or equal to 255"),
    ("max-restarts", '[engines.vllm]\nmax_restarts = 99999999999\n',
     "2:1: engines.vllm.max_restarts:", "less than or equal to 1000"),
    ("key-hash-dots", '[[auth.keys]]\nname = "a"\nkey_hash = "sha256:..."\n',
     "3:1: auth.keys[0].key_hash:", "64 hex digits"),
    ("engine-cuda-env", '[engines.vllm]\nenv = {CUDA_VISIBLE_DEVICES = "1"}\n',
     "2:8: engines.vllm.env.CUDA_VISIBLE_DEVICES:", "gpud sets it itself"),
    ("missing-local-source", '[models.a]\nsource = "/nonexistent/model"\n',
     "2:1: models.a.source:", "/nonexistent/model does not exist"),
    ("missing-relative-source", '[models.a]\nsource = "./no/such/dir"\n',
     "2:1: models.a.source:", "does not exist"),
    ("empty", "", "", "declares nothing (0 bytes"),
    ("whitespace", "  \n\n\t\n", "", "declares nothing"),
    ("comments-only", "# the models go here\n", "", "declares nothing"),
    ("too-many-models", "".join(f'[models.m{i}]\nsource = "org/m"\n'
                                for i in range(MAX_MODELS + 1)), "1:1: models:",
     f"at most {MAX_MODELS} entries (got {MAX_MODELS + 1})"),
]


@pytest.mark.parametrize(("text", "where", "words"), [c[1:] for c in REFUSED],
                         ids=[c[0] for c in REFUSED])
def test_refused_with_a_located_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, where: str, words: str
) -> None:
    path = tmp_path / "gpud.toml"
    path.write_text(text)
    code, err = check(path, capsys)
    assert code == 1, err
    assert "Traceback" not in err
    first = err.splitlines()[0]
    assert first.startswith(f"{path}:{where}"), first
    assert words in first, first


def test_explicit_empty_state_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "gpud.toml"
    path.write_text("models = {}\n")
    assert load_config(path).config.models == {}


def test_an_empty_dropin_is_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "gpud.toml"
    path.write_text('[models.a]\nsource = "org/a"\n')
    (tmp_path / "gpud.d").mkdir()
    (tmp_path / "gpud.d" / "10-b.toml").write_text("")  # mid-save: its models would go
    with pytest.raises(ConfigError, match=r"10-b\.toml: declares nothing"):
        load_config(path)


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "gpud.toml"
    path.write_bytes(b'\xef\xbb\xbf[models.a]\nsource = "org/a"\nstate = "x"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}:3:1: models.a.state:")  # lines still right
    path.write_bytes(b'\xef\xbb\xbf[models.a]\nsource = "org/a"\n')
    assert list(load_config(path).config.models) == ["a"]


def test_an_existing_local_source_and_a_hub_id_are_accepted(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    path = tmp_path / "gpud.toml"
    path.write_text(f'[models.a]\nsource = "{tmp_path / "weights"}"\n'
                    '[models.b]\nsource = "Qwen/Qwen3-8B"\n')
    assert set(load_config(path).config.models) == {"a", "b"}


def test_key_hash_with_the_sha256_prefix_lets_the_key_in(tmp_path: Path) -> None:
    """A prefixed hash passed check, then matched no key: every request was 401."""
    path = tmp_path / "gpud.toml"
    path.write_text(f'[[auth.keys]]\nname = "a"\nkey_hash = "sha256:{hash_key("sk-1")}"\n')
    key = load_config(path).config.auth.keys[0]
    assert key.key_hash is not None
    ring = KeyRing([ApiKey.from_hash(key.name, key.key_hash)])
    assert ring.authenticate("Bearer sk-1") is not None
    assert ring.authenticate("Bearer sk-2") is None


def test_an_empty_key_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "support.key"
    key.write_text("\n")
    key.chmod(0o600)
    path = tmp_path / "gpud.toml"
    path.write_text(f'[[auth.keys]]\nname = "support"\nkey_file = "{key}"\n')
    code, err = check(path, capsys)
    assert code == 1
    assert err.startswith(f"{path}:3:1: auth.keys[0].key_file: {key} is empty"), err


def test_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    """Reading a FIFO blocked forever (and held the daemon's reload lock)."""
    path = tmp_path / "gpud.toml"
    os.mkfifo(path)
    result = check_subprocess(path)
    assert result.returncode == 1
    assert "is a FIFO (named pipe), not a regular file" in result.stderr


def test_a_symlink_to_dev_zero_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gpud.toml"
    path.symlink_to("/dev/zero")
    result = check_subprocess(path)
    assert result.returncode == 1
    assert "is a character device, not a regular file" in result.stderr


def test_a_fifo_dropin_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "gpud.toml"
    path.write_text("models = {}\n")
    (tmp_path / "gpud.d").mkdir()
    os.mkfifo(tmp_path / "gpud.d" / "50-pipe.toml")
    result = check_subprocess(path)
    assert result.returncode == 1
    assert "50-pipe.toml: is a FIFO" in result.stderr


def test_a_huge_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / "gpud.toml"
    with path.open("w") as f:
        f.write("models = {}\n")
        f.write("# padding\n" * 200_000)
    with pytest.raises(ConfigError, match="larger than 1024 KiB"):
        load_config(path)


# --- the property: no input makes `gpud check` print a traceback ---------------------------

KEYS = {
    "daemon": ["tick", "kv_idle_after", "gpu_headroom", "port_range", "listen", "timezone",
               "log_level", "state_dir"],
    "engines.vllm": ["startup_timeout", "stop_timeout", "health_interval", "max_restarts",
                     "restart_backoff", "restart_backoff_max", "env", "command"],
    "models.a": ["source", "gpu", "gpus", "replicas", "max_model_len", "kv_cache", "kv_min",
                 "kv_max", "gpu_memory_utilization", "priority", "idle_sleep_after",
                 "max_concurrency", "max_queue", "request_timeout", "aliases", "args", "env",
                 "port", "drain_timeout", "state", "sleep_level"],
    "policies": ["timeout", "interval", "dir"],
    "profiles.p": ["a"],
}

scalars = st.one_of(
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([0, -1, 2**63, 2**64, 10**23, 65536]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["99999999999d", "0s", "1e300s", "inf", "nan", "-1s", "8GiB", "1e300GiB",
                     "99999999TiB", "0", "", " ", "\ufeff", "1h30m", "500ms", "2d",
                     "99999999999999999999999999m", "awake", "unloaded", "sha256:...",
                     "/nonexistent", "../x", "~nobody/x", "Europe/Paris", "Mars/Olympus",
                     "0.0.0.0:0", "1-2", "18000-17000"]),
    st.text(max_size=20),
    st.booleans(),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.sampled_from(["state", "a", "x", "CUDA_VISIBLE_DEVICES", "replicas"]),
                    inner, max_size=3)), max_leaves=8)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}"
                             for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f'"{k}" = {toml_value(v)}' for k, v in value.items()) + "}"


documents = st.dictionaries(
    st.sampled_from(sorted(KEYS)),
    st.just(None), min_size=1,
).flatmap(lambda tables: st.fixed_dictionaries(
    {t: st.dictionaries(st.sampled_from(KEYS[t]), values, max_size=4) for t in tables}))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(doc=documents)
def test_no_input_makes_check_print_a_traceback(
    doc: dict[str, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = "".join(f"[{table}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in keys.items())
                   for table, keys in doc.items())
    path = tmp_path / "gpud.toml"
    path.write_text(text)
    code, err = check(path, capsys)
    assert code in (0, 1), err
    assert "Traceback" not in err
    # The catch-all names an exception: a value the schema should bound with its own message.
    assert "cannot be checked" not in err, f"{text}\n{err}"
    if code == 1:
        assert err.startswith(str(path)), err
