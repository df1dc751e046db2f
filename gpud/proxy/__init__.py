"""gpud's OpenAI-compatible endpoint (routing, queues, wake-on-request, keys).

The daemon gives it a `Backend`; nothing here imports the reconciler.
"""

from .api import Backend, ModelRoute, ModelUnavailable, ProxyObserver
from .app import INFERENCE_PATHS, MAX_BODY, Proxy, error_response
from .auth import ApiKey, KeyRing, check_key_file, check_key_hash, hash_key, read_key_file
from .limits import ModelGate, QueueFull
from .singleflight import SingleFlight

__all__ = [
    "INFERENCE_PATHS",
    "MAX_BODY",
    "ApiKey",
    "Backend",
    "KeyRing",
    "ModelGate",
    "ModelRoute",
    "ModelUnavailable",
    "Proxy",
    "ProxyObserver",
    "QueueFull",
    "SingleFlight",
    "check_key_file",
    "check_key_hash",
    "error_response",
    "hash_key",
    "read_key_file",
]
