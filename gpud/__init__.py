"""gpud: runs a handful of LLMs (vLLM engines) on the GPUs of one box from a TOML file."""

__version__ = "0.1.0"
