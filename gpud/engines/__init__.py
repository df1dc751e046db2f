"""Engine adapters and process supervision: the edge between gpud and vLLM processes.

`spec` (what an engine is, pure), `vllm` (argv/env and the HTTP control API), `process`
(spawn, follow, exit detection, stop, crash causes, ports), `records` (adoption across
gpud restarts), `restart` (backoff), `models` (tiny test models). Nothing here decides
what should run: that is the planner's and the reconciler's job.
"""
