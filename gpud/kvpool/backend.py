"""Where a KV pool's pages physically live: the small protocol and the two GPU-less backends.

A backend creates the memory behind a page, hands out one file descriptor
per page (exported once, when the page is created, because exporting is the
expensive step), and releases it. ``cuda.CudaBackend`` does this with CUDA
virtual memory; ``MemfdBackend`` with memfd files, so the whole protocol,
fd passing included, runs on machines without a GPU; ``NoBackend`` keeps
books only and passes no fds.

This module must never import CUDA, asyncio or sockets: it is chosen at
start-up on any machine.
"""

from __future__ import annotations

import mmap
import os
from typing import Protocol


class BackendError(RuntimeError):
    """The memory behind a page could not be created, exported or released."""


class PageBackend(Protocol):
    """Physical pages for one GPU's pool, one fd per page."""

    #: Shown in status JSON: "cuda", "memfd" or "none".
    name: str
    page_size: int

    def create(self, page: int) -> int | None:
        """Back ``page`` with memory; return its exported fd (the backend keeps owning it)."""
        ...

    def release(self, page: int) -> None:
        """Give the memory of ``page`` back (to the driver); its fd is closed."""
        ...

    def fd(self, page: int) -> int | None:
        """The fd created for ``page``, or None when the backend passes no fds."""
        ...

    def read(self, page: int, nbytes: int) -> bytes:
        """Read the first ``nbytes`` of a page as gpud sees it (checks and tests)."""
        ...

    def zero(self, pages: list[int]) -> None:
        """Overwrite the pages with zeros, and wait until that is done: a page's bytes never
        reach another model (or a page fresh from the driver, which promises nothing)."""
        ...

    def close(self) -> None:
        """Release every page still backed."""
        ...

    def describe(self) -> dict[str, object]:
        """Plain facts for status JSON (device name, free memory, ...)."""
        ...


class NoBackend:
    """Books only: pages are numbers, no memory and no fds (a machine without GPU)."""

    name = "none"

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._pages: set[int] = set()

    def create(self, page: int) -> int | None:
        self._pages.add(page)
        return None

    def release(self, page: int) -> None:
        self._pages.discard(page)

    def fd(self, page: int) -> int | None:
        return None

    def read(self, page: int, nbytes: int) -> bytes:
        raise BackendError("the KV pool runs without a backend here: pages hold no memory")

    def zero(self, pages: list[int]) -> None:
        return None

    def close(self) -> None:
        self._pages.clear()

    def describe(self) -> dict[str, object]:
        return {"note": "no GPU backend: the pool keeps books only, engines get no memory"}


class MemfdBackend:
    """One memfd per page: host memory standing in for GPU pages where there is no GPU.

    Engines receive a real fd per page and can mmap and write it, so fd
    passing and give-back are exercised end to end on CPU machines.
    """

    name = "memfd"

    def __init__(self, page_size: int, gpu: int = 0) -> None:
        self.page_size = page_size
        self.gpu = gpu
        self._fds: dict[int, int] = {}

    def create(self, page: int) -> int | None:
        if page in self._fds:
            raise BackendError(f"GPU {self.gpu}: page {page} is already backed")
        try:
            fd = os.memfd_create(f"gpud-kv-gpu{self.gpu}-p{page}", os.MFD_CLOEXEC)
            os.ftruncate(fd, self.page_size)
        except OSError as e:
            raise BackendError(f"GPU {self.gpu}: memfd for page {page} failed: {e}") from e
        self._fds[page] = fd
        return fd

    def release(self, page: int) -> None:
        fd = self._fds.pop(page, None)
        if fd is not None:
            os.close(fd)

    def fd(self, page: int) -> int | None:
        return self._fds.get(page)

    def read(self, page: int, nbytes: int) -> bytes:
        fd = self._fds.get(page)
        if fd is None:
            raise BackendError(f"GPU {self.gpu}: page {page} has no memory behind it")
        with mmap.mmap(fd, self.page_size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            return m[:nbytes]

    def zero(self, pages: list[int]) -> None:
        # memfd_create pages start zeroed; a page moving between tenants is punched out.
        for page in pages:
            fd = self._fds.get(page)
            if fd is None:
                raise BackendError(f"GPU {self.gpu}: page {page} has no memory behind it")
            os.pwrite(fd, bytes(self.page_size), 0)

    def close(self) -> None:
        for page in list(self._fds):
            self.release(page)

    def describe(self) -> dict[str, object]:
        return {"note": "memfd pages (host memory) stand in for GPU pages on this machine"}
