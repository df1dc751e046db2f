"""gpud's vLLM plugin: vLLM's KV cache on pages lent by gpud's KV pool.

``register`` is the ``vllm.general_plugins`` entry point. vLLM calls it in
every process it starts (API server, model inspection, EngineCore); it is
cheap and side-effect free: it returns at once unless gpud started this
engine on its pool (``GPUD_KV_SOCKET``), refuses any vLLM but 0.26.0, and
otherwise arranges for the patches to be applied when vLLM's modules load.
No CUDA and no socket here: the pool connection opens at the first KV
allocation, in EngineCore.
"""

from __future__ import annotations

import importlib

_registered = False


def register() -> None:
    """Entry point: install the KV-pool patches when this engine runs on gpud's pool."""
    global _registered
    from gpud_vllm import gate

    if _registered or not gate.enabled():
        return
    problem = gate.version_problem(gate.vllm_version())
    if problem is not None:
        raise gate.refuse(problem)
    # By name: the patch layer is vLLM glue, outside the pure modules' strict typing.
    importlib.import_module("gpud_vllm.patch").install()
    _registered = True
