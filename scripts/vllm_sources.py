"""Unpack the Python sources of a vLLM release wheel (no CUDA libraries, not installed).

The KV plugin's patch layer is tested on CPU against vLLM 0.26.0's real modules
(tests/test_kvplugin_vllm026.py); `make setup` runs this.

    python scripts/vllm_sources.py WHEEL DEST
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path


def main() -> None:
    wheel, dest = Path(sys.argv[1]), Path(sys.argv[2])
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist()
                 if (n.startswith("vllm/") and n.endswith((".py", ".json", ".jinja")))
                 or ".dist-info/" in n]
        z.extractall(dest, names)
    print(f"{len(names)} files of {wheel.name} in {dest}")


if __name__ == "__main__":
    main()
