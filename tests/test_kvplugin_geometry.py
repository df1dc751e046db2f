"""The plugin's KV geometry: blocks per 2 MiB page and page-group sizes (KVPLUGIN.md table)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpud_vllm.geometry import GeometryError, KVGeometry, MiB, block_bytes, dtype_bytes

GiB = 1024 * MiB


@pytest.mark.parametrize(
    ("layers", "heads", "head", "per_page", "tokens", "group_mib"),
    [
        (16, 8, 128, 32, 512, 32),  # the recipe's "large" model: 32 MiB groups (issue 12)
        (16, 8, 64, 64, 1024, 32),  # Llama-3.2-1B
        (24, 2, 64, 256, 4096, 48),  # Qwen2.5-0.5B
        (32, 8, 128, 32, 512, 64),  # Llama-3.1-8B
        (2, 2, 64, 256, 4096, 4),  # the recipe's "tiny"
    ],
)
def test_page_groups_match_the_design_table(
    layers: int, heads: int, head: int, per_page: int, tokens: int, group_mib: int
) -> None:
    g = KVGeometry.from_spec(block_size=16, num_layers=layers, num_kv_heads=heads,
                             head_size=head, dtype="bfloat16", kv_bytes=8 * GiB)
    assert g.blocks_per_page == per_page
    assert g.tokens_per_group == tokens
    assert g.group_bytes == group_mib * MiB


def test_large_model_with_8gib_kv_max() -> None:
    g = KVGeometry.from_spec(block_size=16, num_layers=16, num_kv_heads=8, head_size=128,
                             dtype="torch.bfloat16", kv_bytes=8 * GiB)
    assert g.block_bytes == 64 * 1024
    assert g.num_blocks == 8192  # 8 GiB // 64 KiB // 16 layers, as vLLM's get_num_blocks
    assert g.num_groups == 256 and g.max_pages == 256 * 16  # == kv_max / 2 MiB
    assert g.reserve_bytes == g.tensor_bytes == 512 * MiB
    assert list(g.blocks_of(1)) == list(range(32, 64))
    assert g.group_of(63) == 1 and g.page_offset(1) == 2 * MiB
    assert g.groups_for(1) == 1 and g.groups_for(33) == 2 and g.groups_for(0) == 0


def test_geometries_that_straddle_pages_are_refused() -> None:
    with pytest.raises(GeometryError, match="does not divide"):
        KVGeometry.from_spec(block_size=16, num_layers=32, num_kv_heads=8, head_size=80,
                             dtype="bfloat16", kv_bytes=GiB)
    with pytest.raises(GeometryError, match="dtype"):
        dtype_bytes("complex64")
    with pytest.raises(GeometryError):
        block_bytes(16, 0, 128, 2)


@given(
    heads=st.sampled_from([1, 2, 4, 8, 16]),
    head=st.sampled_from([64, 128, 256]),
    layers=st.integers(1, 80),
    elem=st.sampled_from([1, 2, 4]),
    kv=st.integers(64 * MiB, 64 * GiB),
)
def test_every_block_lies_in_exactly_one_group_and_page(
    heads: int, head: int, layers: int, elem: int, kv: int
) -> None:
    g = KVGeometry.from_spec(block_size=16, num_layers=layers, num_kv_heads=heads,
                             head_size=head, dtype=elem, kv_bytes=kv)
    assert g.blocks_per_page * g.block_bytes == g.page_size
    assert g.num_blocks * g.block_bytes * layers <= kv
    assert sum(len(g.blocks_of(i)) for i in range(g.num_groups)) == g.num_blocks
    last = g.num_blocks - 1
    # The last block's bytes end inside the reserved range of its buffer.
    assert (last + 1) * g.block_bytes <= g.reserve_bytes
    assert g.page_offset(g.group_of(last)) <= last * g.block_bytes < (
        g.page_offset(g.group_of(last)) + g.page_size)
