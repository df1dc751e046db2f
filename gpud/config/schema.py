"""The desired-state file's schema: pydantic v2 models, `extra="forbid"` everywhere.

The schema in code is the truth; `etc/gpud/gpud.toml` documents every key. Pure: validation
only, never reads files, never touches engines.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gpud.config.rules import RulesConfig
from gpud.config.units import Duration, Size, between
from gpud.states import DesiredState

ModelState = DesiredState
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

# Counts past any real box: each bounds the work one config can ask of gpud (60,000 models
# made every request scan them all).
MAX_MODELS = 256
MAX_ENTRIES = 256  # engines, profiles, schedule entries, args, env entries
MAX_KEYS = 4096
MAX_GPU = 255
MAX_MODEL_LEN = 100_000_000  # tokens: ten times the longest context any model has today
MAX_CONNECTIONS = 1_000_000
# A name in `allowed_hosts`: a hostname, ".example.com" (it and its subdomains) or "*" (any).
_LABEL = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}"
_HOST_PATTERN = re.compile(rf"^(\*|\.?{_LABEL}(\.{_LABEL})*\.?)$")

_ms = timedelta(milliseconds=1)
_s = timedelta(seconds=1)
# A loop interval of 0 spins a core; one of days makes gpud deaf to its own schedule.
Interval = Annotated[Duration, between(100 * _ms, timedelta(minutes=10))]
Timeout = Annotated[Duration, between(100 * _ms, timedelta(days=7))]
Short = Annotated[Duration, between(None, timedelta(days=1))]
Text = Annotated[str, Field(max_length=4096)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class DaemonConfig(Strict):
    """Settings of gpud itself; each may also come from a `GPUD_*` environment variable."""

    listen: str = "127.0.0.1:8080"
    state_dir: Path = Path("/var/lib/gpud")
    runtime_dir: Path = Path("/run/gpud")
    timezone: str | None = None
    tick: Interval = timedelta(seconds=2)
    port_range: str = "18000-18999"
    admin_token_file: Path | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    stop_engines_on_exit: bool | None = None
    # The package's upgrade restart leaves the engines running for the new gpud (gpud.upgrade).
    keep_engines_on_upgrade: bool = True
    gpu_headroom: Size = 1024**3
    kv_idle_after: Short = timedelta(seconds=30)
    # Each engine's log: at most engine_log_files files (MODEL.log, .1, ...) of this size.
    engine_log_size: Annotated[Size, Field(ge=4096, le=1024**4)] = 64 * 1024**2
    engine_log_files: int = Field(default=4, ge=1, le=100)
    # The activity log (state_dir/activity.sqlite3) keeps the newest this many requests.
    activity_rows: int = Field(default=100_000, ge=10, le=10_000_000)
    # The listener's defences (gpud.listener): a request head must arrive within
    # header_timeout of the connection (or of its first byte after a keep-alive wait), an
    # idle keep-alive connection is closed after idle_timeout, and at max_connections the
    # longest-idle connection makes room for a new one (none idle: the new one gets a 503).
    header_timeout: Annotated[Duration, between(100 * _ms, timedelta(minutes=10))] = \
        timedelta(seconds=10)
    idle_timeout: Annotated[Duration, between(100 * _ms, timedelta(hours=1))] = \
        timedelta(seconds=60)
    max_connections: int = Field(default=8192, ge=16, le=MAX_CONNECTIONS)
    # Host names the API, the page and an open inference endpoint answer to, besides IP
    # addresses and localhost (a DNS-rebinding page names its own host; gpud.web.hosts).
    allowed_hosts: list[Annotated[str, Field(max_length=253)]] = Field(
        default_factory=list, max_length=MAX_ENTRIES)

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _HOST_PATTERN.match(name):
                raise ValueError(
                    f"{name!r} is not a host name: write \"gpu-box.lan\", \".example.com\" "
                    "(it and its subdomains) or \"*\" (any host: no check), without a port")
        return [n.lower().rstrip(".") if n != "*" else n for n in value]

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r} is not HOST:PORT (e.g. \"127.0.0.1:8080\")")
        host = host.strip("[]")
        if host not in ("localhost", ""):
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"{host!r} is not an IP address or \"localhost\"") from None
        return value

    @field_validator("port_range")
    @classmethod
    def _port_range(cls, value: str) -> str:
        lo, sep, hi = value.partition("-")
        if not (sep and lo.isdigit() and hi.isdigit() and 1024 <= int(lo) <= int(hi) < 65536):
            raise ValueError(f"{value!r} is not a port range like \"18000-18999\" (1024-65535)")
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"{value!r} is not a known time zone (e.g. \"Europe/Paris\")") from None
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]") or "127.0.0.1"

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def ports(self) -> tuple[int, int]:
        lo, _, hi = self.port_range.partition("-")
        return int(lo), int(hi)


class EngineConfig(Strict):
    """How to start one kind of engine; models name it with `engine = "NAME"`."""

    kind: Literal["vllm"] = "vllm"
    command: list[Text] = Field(default_factory=lambda: ["vllm", "serve"], min_length=1,
                                max_length=MAX_ENTRIES)
    startup_timeout: Timeout = timedelta(minutes=15)
    stop_timeout: Short = timedelta(seconds=30)
    sleep_mode: bool = True
    env: dict[str, Text] = Field(default_factory=dict, max_length=MAX_ENTRIES)
    health_interval: Interval = timedelta(seconds=1)
    max_restarts: int = Field(default=5, ge=0, le=1000)
    restart_backoff: Short = timedelta(seconds=2)
    restart_backoff_max: Short = timedelta(minutes=5)
    warm_sleep: bool = True

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str]) -> list[str]:
        if any(not part for part in value):
            raise ValueError(
                "the command is an argv list of non-empty strings, never a shell string")
        if len(value) == 1 and " " in value[0]:
            raise ValueError(
                f"{value[0]!r} looks like a shell string; write an argv list, "
                'e.g. ["vllm", "serve"]'
            )
        return value


class ModelConfig(Strict):
    """One model: what to serve, where, and in which state by default."""

    source: str = Field(min_length=1, max_length=4096)
    engine: str = "vllm"
    gpu: int | None = Field(default=None, ge=0, le=MAX_GPU)
    gpus: list[Annotated[int, Field(ge=0, le=MAX_GPU)]] | None = Field(default=None,
                                                                        max_length=64)
    replicas: int = Field(default=1, ge=0, le=64)
    state: ModelState = "awake"
    sleep_level: Literal[1, 2] = 1
    max_model_len: int | None = Field(default=None, gt=0, le=MAX_MODEL_LEN)
    kv_cache: Size | None = None
    kv_min: Size | None = None
    kv_max: Size | None = None
    kv_pool: bool = False
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000)
    pinned: bool = False
    idle_sleep_after: Annotated[Duration, between(_s)] | None = None
    # None: as many as the engine batches (vLLM's --max-num-seqs in args, else its default).
    max_concurrency: int | None = Field(default=None, ge=1, le=100_000)
    max_queue: int = Field(default=256, ge=0, le=1_000_000)
    request_timeout: Timeout = timedelta(minutes=5)
    load_on_demand: bool = False
    # SSE comments to a streamed request held by a load or a wake, this often; "0s": none
    stream_keepalive: Annotated[Duration, between(None, timedelta(minutes=10))] = timedelta(
        seconds=5)
    aliases: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list, max_length=64)
    args: list[Text] = Field(default_factory=list, max_length=MAX_ENTRIES)
    env: dict[str, Text] = Field(default_factory=dict, max_length=MAX_ENTRIES)
    port: int | None = Field(default=None, ge=1024, lt=65536)
    drain_timeout: Short = timedelta(seconds=60)
    # Request rules (gpud.config.rules): defaults, forced values, removed keys, caps.
    rules: RulesConfig | None = None
    # Replica choice: least outstanding requests, or "prefix": a conversation goes back to
    # the replica that served its start (its prefix cache) unless that replica has more
    # than routing_margin requests outstanding beyond the least loaded one.
    routing: Literal["least-outstanding", "prefix"] = "least-outstanding"
    routing_margin: int = Field(default=4, ge=0, le=100_000)

    @model_validator(mode="after")
    def _kv(self) -> ModelConfig:
        if self.kv_cache is not None and (self.kv_min is not None or self.kv_max is not None):
            raise ValueError("give either kv_cache (a fixed budget) or kv_min/kv_max (the pool)")
        if self.kv_min is not None and self.kv_max is not None and self.kv_min > self.kv_max:
            raise ValueError("kv_min is larger than kv_max")
        if self.gpu is not None and self.gpus is not None:
            raise ValueError("give either gpu (one GPU) or gpus (a list, for replicas)")
        if timedelta(0) < self.stream_keepalive < timedelta(milliseconds=100):
            raise ValueError('stream_keepalive is "0s" (off) or at least 100ms')
        return self

    @property
    def uses_pool(self) -> bool:
        return self.kv_pool or self.kv_min is not None or self.kv_max is not None


class ProfileEntry(Strict):
    state: ModelState | None = None
    replicas: int | None = Field(default=None, ge=0, le=64)


class ScheduleConfig(Strict):
    profile: str
    when: str
    prewake: Short = timedelta(0)
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000)

    @field_validator("when")
    @classmethod
    def _when(cls, value: str) -> str:
        from gpud.schedule import parse_when

        parse_when(value)
        return value


class PoliciesConfig(Strict):
    dir: Path = Path("/etc/gpud/policies")
    enabled: bool = True
    timeout: Annotated[Duration, between(10 * _ms, timedelta(minutes=1))] = timedelta(
        milliseconds=200)
    interval: Interval = timedelta(seconds=5)


class KeyConfig(Strict):
    name: str = Field(min_length=1)
    key_file: Path | None = None
    key_hash: str | None = None
    models: list[str] | None = Field(default=None, max_length=MAX_MODELS)

    @field_validator("key_hash")
    @classmethod
    def _hash(cls, value: str | None) -> str | None:
        # Stored bare: the proxy compares 32 bytes, and "sha256:" once made every key 401.
        if value is None:
            return None
        digest = value.strip().lower().removeprefix("sha256:")
        if len(digest) != 64 or not set(digest) <= set("0123456789abcdef"):
            raise ValueError("must be the sha256 of the key, 64 hex digits, optionally "
                             "prefixed \"sha256:\" (make one with: printf %s \"$KEY\" | sha256sum)")
        return digest

    @model_validator(mode="after")
    def _one_source(self) -> KeyConfig:
        if (self.key_file is None) == (self.key_hash is None):
            raise ValueError("give exactly one of key_file or key_hash (never a plain key)")
        return self


class AuthConfig(Strict):
    keys: list[KeyConfig] = Field(default_factory=list, max_length=MAX_KEYS)
    admin_token_file: Path | None = None


def _profile_entry(value: object) -> object:
    if isinstance(value, str):
        return {"state": value}
    return value


ProfileValue = ProfileEntry


class GpudConfig(Strict):
    """The whole desired-state file after drop-ins are merged."""

    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    engines: dict[str, EngineConfig] = Field(
        default_factory=lambda: {"vllm": EngineConfig()}, max_length=MAX_ENTRIES)
    models: dict[Annotated[str, Field(pattern=MODEL_NAME)], ModelConfig] = Field(
        default_factory=dict, max_length=MAX_MODELS
    )
    profiles: dict[str, dict[str, ProfileValue]] = Field(default_factory=dict,
                                                         max_length=MAX_ENTRIES)
    schedule: list[ScheduleConfig] = Field(default_factory=list, max_length=MAX_ENTRIES)
    policies: PoliciesConfig = Field(default_factory=PoliciesConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)

    @field_validator("profiles", mode="before")
    @classmethod
    def _short_entries(cls, value: object) -> object:
        if isinstance(value, dict):
            return {
                name: {m: _profile_entry(v) for m, v in entries.items()}
                if isinstance(entries, dict)
                else entries
                for name, entries in value.items()
            }
        return value

    @field_validator("engines", mode="before")
    @classmethod
    def _default_engine(cls, value: object) -> object:
        # Declaring [engines.other] must not drop the built-in "vllm" engine.
        if isinstance(value, dict) and "vllm" not in value:
            return {"vllm": {}, **value}
        return value
