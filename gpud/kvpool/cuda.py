"""The KV pool's GPU backend: CUDA virtual memory through cuda-python's driver bindings.

gpud creates physical pages (``cuMemCreate``, POSIX-fd handle type) and
exports each one to an fd once, when it is created (exporting costs ~130 us
per 2 MiB page on an H100, ten times a map). Engines import those fds and
map them into their own reserved ranges (``PageMapper``); gpud maps them
only to check what engines wrote. When the pool shrinks, pages go back to
the driver (``cuMemRelease``).

Every driver call's result is checked; a failure raises ``CudaError`` that
names the call, the driver's error name and what gpud was doing.

cuda-python (``cuda.bindings.driver``) is imported lazily, on first use: gpud
runs on machines without a GPU, where this module is never used. It must
never import torch or anything of the daemon, and must never call
cuMulticast* (shared hosts forbid NVLink multicast).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from gpud.kvpool.backend import BackendError

_driver: Any = None
_SUCCESS: Any = None  # CUresult.CUDA_SUCCESS, looked up once: check() runs on every grant
_lock = threading.Lock()


class CudaError(BackendError):
    """A CUDA driver call failed."""

    def __init__(self, call: str, error: str, doing: str = "") -> None:
        self.call, self.error = call, error
        where = f" while {doing}" if doing else ""
        super().__init__(f"{call} failed with {error}{where}")


class CudaUnavailable(BackendError):
    """No cuda-python or no usable GPU here; the pool runs without a backend."""


def driver() -> Any:
    """The ``cuda.bindings.driver`` module, imported and initialised once."""
    global _driver, _SUCCESS
    if _driver is None:
        with _lock:
            if _driver is None:
                try:
                    from cuda.bindings import driver as d
                except ImportError as e:
                    raise CudaUnavailable(
                        "cuda-python is not installed (pip install 'gpud[gpu]'): "
                        "the KV pool keeps books only"
                    ) from e
                (err,) = d.cuInit(0)
                if err != d.CUresult.CUDA_SUCCESS:
                    raise CudaUnavailable(
                        f"cuInit failed with {_error_name(d, err)}: no usable GPU"
                    )
                _SUCCESS = d.CUresult.CUDA_SUCCESS
                _driver = d
    return _driver


def _error_name(d: Any, err: Any) -> str:
    try:
        e2, name = d.cuGetErrorName(err)
        if e2 == d.CUresult.CUDA_SUCCESS:
            return str(name.decode() if isinstance(name, bytes) else name)
    except Exception:  # an unknown code must still produce a message
        pass
    return str(err)


def check(call: str, result: Any, doing: str = "") -> Any:
    """Unpack a cuda-python result tuple, raising ``CudaError`` unless CUDA_SUCCESS."""
    if result[0] != _SUCCESS:
        raise CudaError(call, _error_name(_driver, result[0]), doing)
    n = len(result)
    if n == 1:
        return None
    return result[1] if n == 2 else result[1:]


def gpu_count() -> int:
    d = driver()
    return int(check("cuDeviceGetCount", d.cuDeviceGetCount()))


class Device:
    """One GPU: its primary context, made current on whichever thread calls."""

    def __init__(self, ordinal: int) -> None:
        d = driver()
        self.ordinal = ordinal
        self.dev = check("cuDeviceGet", d.cuDeviceGet(ordinal), f"opening GPU {ordinal}")
        self.ctx = check(
            "cuDevicePrimaryCtxRetain", d.cuDevicePrimaryCtxRetain(self.dev), f"GPU {ordinal}"
        )
        name = check("cuDeviceGetName", d.cuDeviceGetName(64, self.dev))
        self.name = name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)
        self.current()
        prop = d.CUmemAllocationProp()
        prop.type = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = ordinal
        prop.requestedHandleTypes = (
            d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        )
        self.prop = prop
        self.granularity = int(
            check(
                "cuMemGetAllocationGranularity",
                d.cuMemGetAllocationGranularity(
                    prop, d.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
                ),
            )
        )
        access = d.CUmemAccessDesc()
        access.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = ordinal
        access.flags = d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self.access = [access]
        self.fd_type = d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR

    def current(self) -> None:
        # Contexts are per thread; a ~0.1 us call that saves a class of errors.
        check("cuCtxSetCurrent", driver().cuCtxSetCurrent(self.ctx))

    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes on this GPU, as the driver sees them."""
        self.current()
        free, total = check("cuMemGetInfo", driver().cuMemGetInfo())
        return int(free), int(total)


class PageMapper:
    """A reserved virtual range and the pages mapped into it (engine side, or gpud's own).

    Offsets are byte offsets into the range, multiples of the page size.
    """

    def __init__(self, device: Device, size: int, page_size: int) -> None:
        if page_size % device.granularity or size % page_size:
            raise BackendError(
                f"GPU {device.ordinal}: page size {page_size} and range {size} must be "
                f"multiples of the driver's granularity {device.granularity}"
            )
        self.device, self.size, self.page_size = device, size, page_size
        d = driver()
        device.current()
        self.base = check(
            "cuMemAddressReserve",
            d.cuMemAddressReserve(size, page_size, 0, 0),
            f"reserving {size >> 20} MiB of address space on GPU {device.ordinal}",
        )
        self.base_int = int(self.base)
        self.mapped: dict[int, Any] = {}  # offset -> handle we hold (None: caller's handle)

    def ptr(self, offset: int) -> Any:
        return driver().CUdeviceptr(self.base_int + offset)

    def import_fd(self, fd: int) -> Any:
        """Import a page gpud sent; the fd is closed (the handle keeps the page)."""
        d = driver()
        try:
            return check(
                "cuMemImportFromShareableHandle",
                d.cuMemImportFromShareableHandle(fd, self.device.fd_type),
                f"importing page fd {fd}",
            )
        finally:
            os.close(fd)

    def map_handle(
        self, offset: int, handle: Any, *, access: bool = True, own: bool = False
    ) -> None:
        """Map one page at ``offset`` and, unless told not to, grant this GPU access to it.

        With ``own``, the mapper releases ``handle`` when the page is unmapped.
        """
        if offset % self.page_size or not 0 <= offset < self.size:
            self._bad_offset(offset)
        d = _driver
        ptr = d.CUdeviceptr(self.base_int + offset)
        result = d.cuMemMap(ptr, self.page_size, 0, handle, 0)
        if result[0] != _SUCCESS:
            check("cuMemMap", result, f"mapping a page at offset {offset}")
        self.mapped[offset] = handle if own else None
        if access:
            result = d.cuMemSetAccess(ptr, self.page_size, self.device.access, 1)
            if result[0] != _SUCCESS:
                check("cuMemSetAccess", result, f"granting access to the page at offset {offset}")

    def set_access(self, offset: int, pages: int) -> None:
        """Grant read/write access to ``pages`` consecutive mapped pages in one driver call."""
        d = driver()
        check(
            "cuMemSetAccess",
            d.cuMemSetAccess(self.ptr(offset), pages * self.page_size, self.device.access, 1),
            f"granting access to {pages} pages at offset {offset}",
        )

    def map_fds(self, placed: Sequence[tuple[int, int]]) -> None:
        """Import and map (offset, fd) pairs; access is granted once per run of adjacent pages.

        Each imported handle is released when its page is unmapped, not now:
        that ~10 us per page belongs to reclaim, not to the grant's critical path.
        """
        self.device.current()
        d = driver()
        done: list[int] = []
        try:
            for offset, fd in placed:
                handle = self.import_fd(fd)
                try:
                    self.map_handle(offset, handle, access=False, own=True)
                except BaseException:
                    d.cuMemRelease(handle)
                    raise
                done.append(offset)
            for start, count in _runs(done, self.page_size):
                self.set_access(start, count)
        except BaseException:
            for offset in done:
                self.unmap(offset)
            raise

    def map_handles(self, placed: Sequence[tuple[int, Any]]) -> None:
        """Map (offset, handle) pairs of this process; one access call per adjacent run."""
        self.device.current()
        for offset, handle in placed:
            self.map_handle(offset, handle, access=False)
        for start, count in _runs([o for o, _ in placed], self.page_size):
            self.set_access(start, count)

    def unmap(self, offset: int) -> None:
        d = driver()
        handle = self.mapped.pop(offset, None)
        check(
            "cuMemUnmap",
            d.cuMemUnmap(self.ptr(offset), self.page_size),
            f"unmapping the page at offset {offset}",
        )
        if handle is not None:
            check("cuMemRelease", d.cuMemRelease(handle), "dropping an imported page")

    def unmap_all(self) -> None:
        for offset in sorted(self.mapped):
            self.unmap(offset)

    def fill(self, offset: int, value: int, nbytes: int) -> None:
        """Write the 32-bit ``value`` over ``nbytes`` at ``offset`` (checks and tests)."""
        d = driver()
        self.device.current()
        check("cuMemsetD32", d.cuMemsetD32(self.ptr(offset), value, nbytes // 4))
        check("cuCtxSynchronize", d.cuCtxSynchronize())

    def read(self, offset: int, nbytes: int) -> bytes:
        d = driver()
        self.device.current()
        buf = ctypes.create_string_buffer(nbytes)
        check(
            "cuMemcpyDtoH",
            d.cuMemcpyDtoH(ctypes.addressof(buf), self.ptr(offset), nbytes),
            f"reading {nbytes} bytes at offset {offset}",
        )
        return buf.raw

    def close(self) -> None:
        self.device.current()
        self.unmap_all()
        check("cuMemAddressFree", driver().cuMemAddressFree(self.base, self.size))

    def _bad_offset(self, offset: int) -> None:
        raise BackendError(
            f"offset {offset} is not a page boundary inside the {self.size}-byte range"
        )


def _runs(offsets: Iterable[int], page_size: int) -> list[tuple[int, int]]:
    """Group page offsets into (start, count) runs of adjacent pages."""
    runs: list[tuple[int, int]] = []
    for off in sorted(offsets):
        if runs and runs[-1][0] + runs[-1][1] * page_size == off:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((off, 1))
    return runs


ZERO_BATCH = 64  # pages cleared per device call (128 MiB of gpud's address space)


class CudaBackend:
    """Pages of one GPU's pool as CUDA physical allocations, each exported to an fd once."""

    name = "cuda"

    def __init__(self, gpu: int, page_size: int) -> None:
        self.device = Device(gpu)
        if page_size % self.device.granularity:
            raise BackendError(
                f"GPU {gpu} ({self.device.name}): page size {page_size} is not a multiple of "
                f"the driver's granularity {self.device.granularity}"
            )
        self.gpu = gpu
        self.page_size = page_size
        self._handles: dict[int, Any] = {}
        self._fds: dict[int, int] = {}
        self._scratch: PageMapper | None = None  # gpud's own one-page window, for read()
        self._zero_window: PageMapper | None = None  # ZERO_BATCH pages, for zero()

    def create(self, page: int) -> int | None:
        if page in self._handles:
            raise BackendError(f"GPU {self.gpu}: page {page} is already backed")
        d = driver()
        self.device.current()
        handle = check(
            "cuMemCreate",
            d.cuMemCreate(self.page_size, self.device.prop, 0),
            f"creating page {page} ({self.page_size >> 20} MiB) on GPU {self.gpu}",
        )
        try:
            fd = int(
                check(
                    "cuMemExportToShareableHandle",
                    d.cuMemExportToShareableHandle(handle, self.device.fd_type, 0),
                    f"exporting page {page} to an fd",
                )
            )
        except BaseException:
            d.cuMemRelease(handle)
            raise
        os.set_inheritable(fd, False)
        self._handles[page], self._fds[page] = handle, fd
        return fd

    def handle(self, page: int) -> Any:
        """The page's handle in gpud's own process (in-process grants map it directly)."""
        return self._handles[page]

    def release(self, page: int) -> None:
        handle = self._handles.pop(page, None)
        fd = self._fds.pop(page, None)
        if fd is not None:
            os.close(fd)
        if handle is not None:
            self.device.current()
            check("cuMemRelease", driver().cuMemRelease(handle), f"releasing page {page}")

    def fd(self, page: int) -> int | None:
        return self._fds.get(page)

    def zero(self, pages: list[int]) -> None:
        """Map the pages into gpud's own window (up to ZERO_BATCH at a time), clear them on
        the device, wait for it, unmap: about 40 us a page, mostly the mapping calls."""
        if not pages:
            return
        d = driver()
        if self._zero_window is None:
            self._zero_window = PageMapper(self.device, ZERO_BATCH * self.page_size,
                                           self.page_size)
        w = self._zero_window
        for i in range(0, len(pages), ZERO_BATCH):
            batch = pages[i : i + ZERO_BATCH]
            placed = [(k * self.page_size, self._handles[p]) for k, p in enumerate(batch)]
            w.map_handles(placed)
            try:
                check("cuMemsetD8", d.cuMemsetD8(w.ptr(0), 0, len(batch) * self.page_size),
                      f"zeroing {len(batch)} pages")
                check("cuCtxSynchronize", d.cuCtxSynchronize(), "zeroing pages")
            finally:
                for off, _ in placed:
                    w.unmap(off)

    def read(self, page: int, nbytes: int) -> bytes:
        if page not in self._handles:
            raise BackendError(f"GPU {self.gpu}: page {page} has no memory behind it")
        if self._scratch is None:
            self._scratch = PageMapper(self.device, self.page_size, self.page_size)
        self._scratch.map_handle(0, self._handles[page])
        try:
            return self._scratch.read(0, nbytes)
        finally:
            self._scratch.unmap(0)

    def close(self) -> None:
        for w in (self._scratch, self._zero_window):
            if w is not None:
                w.close()
        self._scratch = self._zero_window = None
        for page in list(self._handles):
            self.release(page)

    @property
    def live_pages(self) -> int:
        return len(self._handles)

    def describe(self) -> dict[str, object]:
        free, total = self.device.mem_info()
        return {
            "device": self.device.name,
            "gpu_free_bytes": free,
            "gpu_total_bytes": total,
            "pages_created": len(self._handles),
        }
