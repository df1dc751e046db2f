"""The vLLM 0.26.0 patch layer: KV tensors over gpud's pages, a block pool that grows by
page groups, give-back when idle or asked, all pages back on /sleep.

Patch points (KVPLUGIN.md section 2, vLLM 0.26.0 names):
  1. KV allocation: V2 ``vllm.v1.worker.gpu.attn_utils._allocate_kv_cache`` and V1
     ``GPUModelRunner._allocate_kv_cache_tensors`` return tensors over reserved ranges
     (vLLM's own reshape then gives the stock layout, byte for byte).
  2. ``KVCacheCoordinator.__init__`` swaps its ``BlockPool`` for ``GpudBlockPool``.
  3. ``KVCacheManager.allocate_slots``: when it finds too few free blocks, ask for page
     groups; wait for them only where vLLM would preempt (or idle), else a later step.
  4. Sleep: the "cumem" sleep-mode backend is replaced by a subclass that returns every
     page on suspend and takes group 0 back on resume.
  5. Capacity: none; gpud passes ``--kv-cache-memory-bytes`` = kv_max.
Plus: ``EngineArgs.create_engine_config`` refuses out-of-scope setups in the API server
before any engine starts, and ``EngineCoreProc`` steps run under the plugin's lock so
that gpud's give-back requests (answered by the pool thread, ``gpud_vllm.lease``) never
race the scheduler; after each step the plugin records the fence for idle-time give-backs,
retires groups gpud asked for and takes in groups mapped ahead of need.

Every vLLM name is looked up when its module is first imported (a post-import hook), so
installing the patches imports nothing of vLLM's GPU stack in the API server. Only
``register`` (after the version check) calls ``install``. Nothing here is testable
without vLLM 0.26.0 on a GPU beyond import-safety: bench/gpu/kvplugin.py runs it.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from gpud_vllm import gate
from gpud_vllm.geometry import PAGE_SIZE, KVGeometry, dtype_bytes
from gpud_vllm.lease import PoolExhausted, PoolLink

log = logging.getLogger("vllm.gpud_kv")  # under vLLM's logger: its handlers, its format

Hook = Callable[[ModuleType], None]

# After gpud refused pages, ask again no sooner than this (another model may go idle soon).
RETRY_AFTER_S = 0.2

# -- post-import hooks ---------------------------------------------------------------------


class _HookLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, hooks: list[Hook]) -> None:
        self.loader, self.hooks = loader, hooks

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        create = getattr(self.loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        for hook in self.hooks:
            hook(module)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs hooks on a module right after it is executed, wherever it is imported from."""

    def __init__(self) -> None:
        self.hooks: dict[str, list[Hook]] = {}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        hooks = self.hooks.pop(fullname, None)
        if hooks is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _HookLoader(spec.loader, hooks)
                return spec
        return None


_finder = _PostImportFinder()


def when_imported(name: str, hook: Hook) -> None:
    """Run ``hook(module)`` now if ``name`` is imported, else right after its import."""
    module = sys.modules.get(name)
    if module is not None:
        hook(module)
        return
    _finder.hooks.setdefault(name, []).append(hook)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


# -- the engine's plugin state (TP=1: pool and tensors share the EngineCore process) --------


class _Plugin:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.link: PoolLink | None = None
        self.mapper: Any = None
        self.tensors: list[Any] = []
        self.geometry: KVGeometry | None = None
        self.profiling = False
        self.engine_thread: int | None = None
        self.last_step: Any = None  # a CUDA event recorded after the latest engine step

    def allocate(self, kv_cache_config: Any, device: Any) -> dict[str, Any]:
        """``{layer: int8 tensor}`` over gpud's pages, for either model runner."""
        geometry = _geometry_of(kv_cache_config)
        with self.lock:
            if self.link is None:
                self._connect(geometry, device)
            elif geometry != self.geometry:
                raise gate.refuse(
                    f"the KV cache was laid out twice with different geometries "
                    f"({self.geometry} then {geometry})"
                )
        out: dict[str, Any] = {}
        for tensor, kv in zip(self.tensors, kv_cache_config.kv_cache_tensors, strict=True):
            for layer in kv.shared_by:
                out[layer] = tensor
        return out

    def _connect(self, geometry: KVGeometry, device: Any) -> None:
        import torch

        from gpud.kvpool.client import KVPoolClient
        from gpud_vllm.vmm import CudaGroupMapper

        index = device.index if device.index is not None else torch.cuda.current_device()
        client = KVPoolClient.from_env(on_give_back=self._give_back)
        mapper = CudaGroupMapper(geometry, index)
        self.engine_thread = threading.get_ident()
        link = PoolLink(geometry, client, mapper, lock=self.lock, fence=self._fence,
                        retry_after=RETRY_AFTER_S)
        self.link = link  # gpud may ask for pages back while it lends group 0
        try:
            link.start()  # group 0 now; the pool thread answers gpud from here on
        except BaseException:
            self.link = None
            raise
        self.mapper, self.geometry = mapper, geometry
        self.tensors = mapper.tensors(device)
        log.info(
            "gpud-kv: KV cache on gpud's pool (model %s, %s): %s; growth ahead of need: %s",
            client.tenant, client.backend, geometry.describe(), link.growth,
        )

    def _give_back(self, n: int) -> list[int]:
        assert self.link is not None
        return self.link.handle_give_back(n)

    def _fence(self) -> Any:
        """A CUDA event after every KV write launched so far: recorded now on the engine's
        stream (vLLM's, current on its thread), else the one after its latest step (no
        step runs while another thread holds the plugin lock)."""
        if threading.get_ident() == self.engine_thread:
            import torch

            event = torch.cuda.Event()
            event.record()
            return event
        return self.last_step

    def after_step(self) -> None:
        """After each engine step (under the lock): the fence for idle-time give-backs,
        gpud's pending asks, groups the pool thread mapped meanwhile."""
        link = self.link
        if link is None:
            return
        import torch

        t0 = time.perf_counter()
        event = torch.cuda.Event()
        event.record()
        self.last_step = event
        link.service()
        link.absorb()
        stats, now = link.stats, time.monotonic()
        stats.hook_s += time.perf_counter() - t0
        stats.hook_calls += 1
        if stats.grants and now - stats.last_logged >= 10.0:
            stats.last_logged = now
            log.info("gpud-kv: %s; %s", stats.line(), link.summary())

    def sleep(self) -> None:
        with self.lock:
            if self.link is not None and not self.link.book.asleep:
                pages = self.link.sleep()
                log.info("gpud-kv: sleep returned %d pages to gpud", pages)

    def wake(self) -> None:
        with self.lock:
            if self.link is not None and self.link.book.asleep:
                self.link.wake()  # its blocks reach the block pool through on_fresh
                log.info("gpud-kv: wake took page group 0 back")


class _Throttled:
    """One warning per ``every`` seconds while the pool stays exhausted, with a count."""

    def __init__(self, every: float = 10.0) -> None:
        self.every, self.last, self.count = every, -1e9, 0

    def note(self, why: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.every:
            log.warning("gpud-kv: pool exhausted, the scheduler preempts or queues "
                        "(%d times so far): %s", self.count, why)
            self.last = now


_exhausted = _Throttled()
plugin = _Plugin()
_pool_ref: list[Any] = []  # the GpudBlockPool of this process, once the scheduler made it


def _geometry_of(kv_cache_config: Any) -> KVGeometry:
    groups = kv_cache_config.kv_cache_groups
    tensors = kv_cache_config.kv_cache_tensors
    spec = groups[0].kv_cache_spec if groups else None
    facts = gate.EngineFacts(
        kv_groups=len(groups),
        kv_spec=type(spec).__name__,
        packed_kv=any(t.block_stride > 0 for t in tensors),
        hybrid=bool(getattr(kv_cache_config, "needs_kv_cache_zeroing", False)),
        block_bytes=spec.page_size_bytes if spec is not None else None,
    )
    problems = gate.setup_problems(facts)
    if spec is not None and not problems:
        want = spec.page_size_bytes * kv_cache_config.num_blocks
        odd = [t.size for t in tensors if t.size != want]
        if odd:
            problems.append(f"layer buffers of {odd[:3]} bytes, not {want}")
    if problems:
        raise gate.refuse(problems)
    assert spec is not None
    return KVGeometry(spec.page_size_bytes, len(tensors), kv_cache_config.num_blocks,
                      spec.block_size)


# -- patch points --------------------------------------------------------------------------


def _patch_v2_allocator(mod: ModuleType) -> None:
    original = mod._allocate_kv_cache

    @functools.wraps(original)
    def _allocate_kv_cache(kv_cache_config: Any, shared_layers: Any, device: Any) -> Any:
        return plugin.allocate(kv_cache_config, device)

    _allocate_kv_cache.__gpud_original__ = original  # type: ignore[attr-defined]
    mod._allocate_kv_cache = _allocate_kv_cache


def _patch_v1_runner(mod: ModuleType) -> None:
    cls = mod.GPUModelRunner
    alloc, init = cls._allocate_kv_cache_tensors, cls.initialize_kv_cache

    @functools.wraps(init)
    def initialize_kv_cache(self: Any, kv_cache_config: Any, is_profiling: bool = False) -> Any:
        plugin.profiling = is_profiling
        try:
            return init(self, kv_cache_config, is_profiling=is_profiling)
        finally:
            plugin.profiling = False

    @functools.wraps(alloc)
    def _allocate_kv_cache_tensors(self: Any, kv_cache_config: Any) -> Any:
        if plugin.profiling:  # cudagraph memory profiling: a throwaway stock buffer
            return alloc(self, kv_cache_config)
        return plugin.allocate(kv_cache_config, self.device)

    cls.initialize_kv_cache = initialize_kv_cache
    cls._allocate_kv_cache_tensors = _allocate_kv_cache_tensors


def _make_block_pool(mod: ModuleType) -> type:
    from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue

    class GpudBlockPool(mod.BlockPool):  # type: ignore[name-defined,misc]
        """vLLM's BlockPool whose free queue holds only blocks of mapped page groups."""

        def __init__(self, *args: Any, link: PoolLink, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if self.num_gpu_blocks != link.geometry.num_blocks:
                raise gate.refuse(
                    f"the block pool has {self.num_gpu_blocks} blocks, the KV tensors "
                    f"{link.geometry.num_blocks}"
                )
            self.link = link
            for b in self.blocks:
                b.prev_free_block = b.next_free_block = None
            link.absorb()
            self.free_block_queue = FreeKVCacheBlockQueue(
                [self.blocks[i] for i in link.book.free_ids()]
            )
            link.on_retire = self._retire
            link.on_fresh = self.add_free
            link.keep_ahead(self.free_block_queue.num_free_blocks)

        def add_free(self, block_ids: list[int]) -> None:
            """Newly mapped blocks: at the front, so they are used before cached ones."""
            self.free_block_queue.prepend_n([self.blocks[i] for i in block_ids])

        def _retire(self, block_ids: list[int]) -> None:
            for i in block_ids:
                block = self.blocks[i]
                self._maybe_evict_cached_block(block)
                self.free_block_queue.remove(block)

        def fresh_ahead(self, limit: int) -> int:
            """Never-cached blocks at the front of the free queue, counting up to ``limit``
            (vLLM takes these before it evicts a cached block)."""
            q, count = self.free_block_queue, 0
            block = q.fake_free_list_head.next_free_block
            while count < limit and block is not None and block is not q.fake_free_list_tail:
                if block.block_hash is not None:
                    break
                block, count = block.next_free_block, count + 1
            return count

        def get_num_free_blocks(self) -> int:
            t0 = time.perf_counter()
            self.link.absorb()  # groups the pool thread mapped since the last look
            n = int(super().get_num_free_blocks())
            self._spent(t0)
            return n

        def _spent(self, t0: float) -> None:
            """Account a hook's time (the stats line says what the plugin costs a step)."""
            stats = self.link.stats
            stats.hook_s += time.perf_counter() - t0
            stats.hook_calls += 1

        def _keep_ahead(self) -> None:
            free = self.free_block_queue.num_free_blocks
            if not self.enable_caching:
                self.link.keep_ahead(free)
                return
            # Stock vLLM has its whole budget mapped and evicts a cached block only when no
            # never-used one is left; so grow (ahead of need) before cached blocks reach the
            # front, while they are fewer than the cache cap (Growth.cache_groups). The walk
            # is capped; past the cap the free count decides.
            cap = 512
            fresh = self.fresh_ahead(cap)
            keep = self.link.growth.cache_groups * self.link.geometry.blocks_per_group
            self.link.keep_ahead(free if fresh >= cap or free - fresh >= keep else fresh)

        def get_new_blocks(self, num_blocks: int) -> list[Any]:
            t0 = time.perf_counter()
            self.link.absorb()
            if num_blocks > super().get_num_free_blocks():
                raise PoolExhausted(
                    f"{num_blocks} blocks wanted, {super().get_num_free_blocks()} mapped "
                    f"free: {self.link.last_refusal}"
                )
            blocks = super().get_new_blocks(num_blocks)
            self.link.book.take(b.block_id for b in blocks)
            self._keep_ahead()
            self._spent(t0)
            return list(blocks)

        def touch(self, blocks: Sequence[Any]) -> None:
            t0 = time.perf_counter()
            revived = [b.block_id for b in blocks if b.ref_cnt == 0 and not b.is_null]
            super().touch(blocks)
            self.link.book.take(dict.fromkeys(revived))
            self._spent(t0)

        def free_blocks(self, ordered_blocks: Any) -> None:
            t0 = time.perf_counter()
            blocks = list(ordered_blocks)
            super().free_blocks(blocks)
            freed = {b.block_id for b in blocks if b.ref_cnt == 0 and not b.is_null}
            self.link.book.release(freed)
            self._spent(t0)

        def get_usage(self) -> float:
            total = self.num_gpu_blocks - 1
            return self.link.book.used_blocks / total if total else 0.0

        def reset_prefix_cache(self) -> bool:
            # Stock compares num_gpu_blocks - free with 1 (the null block); with a virtual
            # pool "free" counts mapped blocks only, so present the numbers it expects.
            virtual = self.num_gpu_blocks
            self.num_gpu_blocks = self.get_num_free_blocks() + 1 + self.link.book.used_blocks
            try:
                return bool(super().reset_prefix_cache())
            finally:
                self.num_gpu_blocks = virtual

    return GpudBlockPool


def _patch_coordinator(mod: ModuleType) -> None:
    import vllm.v1.core.block_pool as bp

    pool_cls = _make_block_pool(bp)
    cls = mod.KVCacheCoordinator
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, kv_cache_config: Any, *args: Any, **kwargs: Any) -> None:
        init(self, kv_cache_config, *args, **kwargs)
        link = plugin.link
        if link is None:
            raise gate.refuse(
                "the scheduler's block pool was built before the KV tensors were mapped "
                "(an executor other than the one-process one?)"
            )
        old = self.block_pool
        with plugin.lock:  # the pool thread may answer gpud meanwhile
            pool = _new_pool(pool_cls, old, link)
        self.block_pool = pool
        for manager in self.single_type_managers:
            manager.block_pool = pool
            manager._null_block = pool.null_block
        _pool_ref[:] = [pool]

    cls.__init__ = __init__


def _new_pool(pool_cls: type, old: Any, link: PoolLink) -> Any:
    return pool_cls(
        num_gpu_blocks=old.num_gpu_blocks,
        enable_caching=old.enable_caching,
        hash_block_size=old.hash_block_size,
        enable_kv_cache_events=old.enable_kv_cache_events,
        metrics_collector=old.metrics_collector,
        link=link,
    )


def _patch_allocate_slots(mod: ModuleType) -> None:
    cls = mod.KVCacheManager
    original = cls.allocate_slots

    @functools.wraps(original)
    def allocate_slots(self: Any, request: Any, num_new_tokens: int, *args: Any,
                       **kwargs: Any) -> Any:
        pool = self.block_pool
        try:
            out = original(self, request, num_new_tokens, *args, **kwargs)
            link: PoolLink | None = getattr(pool, "link", None)
            if out is not None or link is None:
                return out
            return _grow_for(self, link, request, num_new_tokens, kwargs,
                             lambda: original(self, request, num_new_tokens, *args, **kwargs))
        except PoolExhausted as e:
            _exhausted.note(str(e))
            return None

    cls.allocate_slots = allocate_slots


def _grow_for(manager: Any, link: PoolLink, request: Any, num_new_tokens: int,
              kwargs: dict[str, Any], retry: Callable[[], Any]) -> Any:
    """A request found too few mapped free blocks. Ask the pool thread for them (plus a step
    ahead). Wait for them only where vLLM would otherwise preempt (a running request) or
    sit idle (nothing scheduled); a waiting request just waits for a later step."""
    size = link.geometry.block_size
    lookahead = int(kwargs.get("num_lookahead_tokens", 0))
    need = (-(-(num_new_tokens + lookahead) // size) + 1
            + int(getattr(manager, "watermark_blocks", 0)) + int(kwargs.get("reserved_blocks", 0)))
    link.short_by(need)
    running = getattr(getattr(request, "status", None), "name", "") == "RUNNING"
    if not (running or not kwargs.get("has_scheduled_reqs", True)
            or link.book.used_blocks == 0):
        return None
    for _ in range(8):
        if not link.growing:
            return None
        link.wait_growth()
        out = retry()
        if out is not None:
            return out
        link.short_by(need)
    return None


def _patch_sleep_backend(mod: ModuleType) -> None:
    base = mod.CuMemBackend

    class GpudCuMemBackend(base):  # type: ignore[misc,valid-type]
        """vLLM's cumem sleep, plus: every KV page back to gpud on sleep, group 0 on wake."""

        def suspend(self, level: int = 1) -> None:
            super().suspend(level)
            plugin.sleep()

        def resume(self, tags: list[str] | None = None) -> None:
            super().resume(tags)
            if tags is None or "kv_cache" in tags:
                plugin.wake()

    mod.SleepModeBackendFactory._registry["cumem"] = lambda: GpudCuMemBackend


def _patch_engine_core(mod: ModuleType) -> None:
    cls = mod.EngineCoreProc
    for name in ("_process_engine_step", "_handle_client_request"):
        original = getattr(cls, name)
        step = name == "_process_engine_step"

        def locked(self: Any, *args: Any, __original: Any = original, __step: bool = step,
                   **kwargs: Any) -> Any:
            with plugin.lock:
                out = __original(self, *args, **kwargs)
                if __step:
                    plugin.after_step()
                return out

        setattr(cls, name, functools.wraps(original)(locked))


def _patch_engine_args(mod: ModuleType) -> None:
    cls = mod.EngineArgs
    original = cls.create_engine_config

    @functools.wraps(original)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        config = original(self, *args, **kwargs)
        problems = gate.setup_problems(engine_facts(config))
        if problems:
            raise gate.refuse(problems)
        return config

    cls.create_engine_config = create_engine_config


def engine_facts(config: Any) -> gate.EngineFacts:
    """What ``gate.setup_problems`` checks, read from a ``VllmConfig`` (API server side)."""
    par, model, cache = config.parallel_config, config.model_config, config.cache_config
    kvt = config.kv_transfer_config
    block: int | None = None
    try:
        dt = cache.cache_dtype
        elem = model.dtype.itemsize if dt == "auto" else dtype_bytes(str(dt))
        block = 2 * cache.block_size * model.get_num_kv_heads(par) * model.get_head_size() * elem
    except Exception as e:  # the EngineCore-side check sees the real spec anyway
        log.debug("gpud-kv: no early geometry check: %s", e)
    return gate.EngineFacts(
        tensor_parallel=par.tensor_parallel_size,
        pipeline_parallel=par.pipeline_parallel_size,
        data_parallel=par.data_parallel_size,
        kv_connector=getattr(kvt, "kv_connector", None) if kvt is not None else None,
        hybrid=bool(model.is_hybrid),
        attention_free=bool(model.is_attention_free),
        block_bytes=block,
        page_size=PAGE_SIZE,
    )


PATCHES: dict[str, Hook] = {
    "vllm.engine.arg_utils": _patch_engine_args,
    "vllm.v1.engine.core": _patch_engine_core,
    "vllm.v1.worker.gpu.attn_utils": _patch_v2_allocator,
    "vllm.v1.worker.gpu_model_runner": _patch_v1_runner,
    "vllm.v1.core.kv_cache_coordinator": _patch_coordinator,
    "vllm.v1.core.kv_cache_manager": _patch_allocate_slots,
    "vllm.device_allocator.sleep_mode_backend": _patch_sleep_backend,
}

_installed = False


def install() -> None:
    """Arrange every patch; each applies when (or if already) its module is imported."""
    global _installed
    if _installed:
        return
    _installed = True
    for name, hook in PATCHES.items():
        when_imported(name, hook)
    log.info("gpud-kv: vLLM patches armed (KV cache on gpud's pool)")
