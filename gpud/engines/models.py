"""Tiny real models for tests and `gpud demo`, made once and cached on disk.

The model is made by `tinymodel.py`, run with the engine's interpreter (it needs torch,
which gpud's virtualenv does not have). This module must never import torch or vLLM.
"""

from __future__ import annotations

import fcntl
import subprocess
from pathlib import Path

TINYMODEL_SCRIPT = Path(__file__).with_name("tinymodel.py")


class ModelBuildError(Exception):
    pass


def ensure_tiny_model(
    outdir: Path, vllm_python: Path | str, *, seed: int = 0, timeout: float = 600.0,
    kind: str = "generate",
) -> Path:
    """Make the tiny model in OUTDIR unless it is there; returns OUTDIR. Concurrent callers
    (parallel test workers, two demos) wait on a lock file and make it once."""
    outdir = Path(outdir).absolute()
    if (outdir / "config.json").exists():
        return outdir
    outdir.parent.mkdir(parents=True, exist_ok=True)
    with open(outdir.parent / f".{outdir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (outdir / "config.json").exists():
            return outdir
        argv = [str(vllm_python), str(TINYMODEL_SCRIPT), str(outdir), "--seed", str(seed),
                "--kind", kind]
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ModelBuildError(f"cannot make the tiny model in {outdir}: {e}") from e
        if done.returncode != 0 or not (outdir / "config.json").exists():
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
            raise ModelBuildError(
                f"making the tiny model in {outdir} failed (exit {done.returncode}) with "
                f"{vllm_python}; is the engine virtualenv installed (`make .venv-vllm`)?\n"
                f"{tail}"
            )
    return outdir
