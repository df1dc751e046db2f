"""A ``GroupMapper`` over host memory: memfd pages from gpud's ``MemfdBackend``, for CPU tests.

Each layer buffer is a dict of mmapped pages; unmapped groups read and write
one shared scratch page, as on the GPU. It shows on a machine without a GPU
that the fds gpud lends are the memory the plugin writes.

It must never import torch, vLLM or CUDA.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Sequence


class MemfdGroupMapper:
    def __init__(self, num_tensors: int, page_size: int) -> None:
        self.num_tensors = num_tensors
        self.page_size = page_size
        self.scratch = mmap.mmap(-1, page_size)
        self.pages: list[dict[int, mmap.mmap]] = [{} for _ in range(num_tensors)]
        self.fences: list[object] = []  # the fences waited for, in order

    def map_group(self, group: int, fds: Sequence[int | None]) -> None:
        try:
            if len(fds) != self.num_tensors:
                raise ValueError(f"group {group}: {len(fds)} pages for {self.num_tensors} buffers")
            if any(group in t for t in self.pages):
                raise ValueError(f"group {group} is already mapped")
            for i, fd in enumerate(fds):
                if fd is None:
                    raise ValueError("gpud sent pages without fds: its pool has no backend")
                self.pages[i][group] = mmap.mmap(fd, self.page_size, mmap.MAP_SHARED)
        except BaseException:
            for buf in self.pages:
                m = buf.pop(group, None)
                if m is not None:
                    m.close()
            raise
        finally:
            for fd in fds:
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def unmap_group(self, group: int) -> None:
        for t in self.pages:
            t.pop(group).close()

    def wait(self, fence: object) -> None:
        self.fences.append(fence)

    def view(self, tensor: int, group: int) -> mmap.mmap:
        """The memory behind ``group`` in buffer ``tensor``: its page, or the scratch page."""
        return self.pages[tensor].get(group, self.scratch)

    def close(self) -> None:
        for t in self.pages:
            for m in t.values():
                m.close()
            t.clear()
        self.scratch.close()
