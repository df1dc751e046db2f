"""The GPU side: one reserved virtual range per layer buffer, a scratch page under every
unbacked offset, gpud's pages mapped over it per page group, torch tensors over the ranges.

Probe facts this relies on (H100, KVPLUGIN.md section 3): ``torch.as_tensor`` on an
object with ``__cuda_array_interface__`` and an explicit ``device`` gives a tensor
over the reserved range; one scratch page mapped many times absorbs stray writes;
CUDA graphs captured over the range stay correct across remaps; a page is one
handle is one fd.

Runs only inside EngineCore on a GPU. torch and cuda-python are imported lazily;
importing this module is safe anywhere. It must never call cuMulticast*.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

from gpud_vllm.geometry import KVGeometry


class _DeviceRange:
    """``__cuda_array_interface__`` of one reserved range, as int8 bytes."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|i1",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
        }


class CudaGroupMapper:
    """``GroupMapper`` on CUDA virtual memory (gpud.kvpool.cuda's Device and PageMapper)."""

    def __init__(self, geometry: KVGeometry, device_index: int) -> None:
        from gpud.kvpool.cuda import Device, PageMapper, check, driver

        self.geometry = geometry
        self.device = Device(device_index)
        d = driver()
        page = geometry.page_size
        self.scratch = check(
            "cuMemCreate", d.cuMemCreate(page, self.device.prop, 0), "creating the scratch page"
        )
        self.ranges: list[Any] = []
        try:
            for _ in range(geometry.num_tensors):
                m = PageMapper(self.device, geometry.reserve_bytes, page)
                self.ranges.append(m)
                for off in range(0, geometry.reserve_bytes, page):
                    m.map_handle(off, self.scratch, access=False)
                m.set_access(0, geometry.reserve_bytes // page)
        except BaseException:
            self.close()
            raise

    def map_group(self, group: int, fds: Sequence[int | None]) -> None:
        self.device.current()  # the pool thread's calls need the context too
        off = self.geometry.page_offset(group)
        todo = list(fds)
        done: list[Any] = []
        try:
            if len(todo) != len(self.ranges) or any(fd is None for fd in todo):
                raise RuntimeError(
                    f"page group {group}: gpud sent {len(todo)} pages "
                    f"({sum(fd is None for fd in todo)} without fd) for {len(self.ranges)} "
                    f"layer buffers; is its pool on the CUDA backend?"
                )
            for m in self.ranges:
                fd = todo.pop(0)
                m.unmap(off)  # the scratch page (not ours to release)
                try:
                    assert fd is not None
                    m.map_fds([(off, fd)])
                except BaseException:
                    m.map_handle(off, self.scratch)
                    raise
                done.append(m)
        except BaseException:
            for fd in todo:
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            for m in done:
                m.unmap(off)
                m.map_handle(off, self.scratch)
            raise

    def unmap_group(self, group: int) -> None:
        self.device.current()
        off = self.geometry.page_offset(group)
        for m in self.ranges:
            m.unmap(off)  # releases the imported handle: the page is gpud's again
            m.map_handle(off, self.scratch)

    def wait(self, fence: Any) -> None:
        """Wait for the work a fence covers: a torch CUDA event recorded on the engine's
        stream after the blocks left service. None (no step has run yet): the whole
        context, as a last resort."""
        if fence is not None:
            fence.synchronize()
            return
        from gpud.kvpool.cuda import check, driver

        self.device.current()
        check("cuCtxSynchronize", driver().cuCtxSynchronize(), "fencing KV pages")

    def tensors(self, device: Any) -> list[Any]:
        """One int8 tensor of ``KVCacheTensor.size`` bytes per layer buffer, over its range."""
        import torch

        return [
            torch.as_tensor(_DeviceRange(m.base_int, self.geometry.reserve_bytes), device=device)[
                : self.geometry.tensor_bytes
            ]
            for m in self.ranges
        ]

    def close(self) -> None:
        from gpud.kvpool.cuda import driver

        for m in self.ranges:
            m.close()
        self.ranges = []
        if self.scratch is not None:
            driver().cuMemRelease(self.scratch)
            self.scratch = None
