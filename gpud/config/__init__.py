"""The desired-state file: schema, loading with located errors, drop-ins, edits. Pure core."""

from gpud.config.diff import reload_effects
from gpud.config.load import (
    DEFAULT_PATH,
    EMBEDDED_DEFAULT,
    ConfigError,
    EmptyConfigError,
    ErrorItem,
    LoadedConfig,
    load_config,
    zone_of,
)
from gpud.config.schema import GpudConfig, ModelConfig

__all__ = [
    "DEFAULT_PATH",
    "EMBEDDED_DEFAULT",
    "ConfigError",
    "EmptyConfigError",
    "ErrorItem",
    "GpudConfig",
    "LoadedConfig",
    "ModelConfig",
    "load_config",
    "reload_effects",
    "zone_of",
]
