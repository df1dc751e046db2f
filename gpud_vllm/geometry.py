"""KV geometry: how vLLM's blocks fall onto gpud's 2 MiB pages, as plain integers.

vLLM 0.26 keeps one KV buffer per layer (one ``KVCacheTensor`` each), blocks
first: block ``b`` of a layer is bytes ``[b*P, (b+1)*P)`` of that layer's
buffer, where ``P = 2 * block_size * kv_heads * head_size * dtype_bytes``. A
2 MiB page therefore holds ``2 MiB / P`` consecutive blocks of one layer, and
a block is usable only when its page is mapped in every layer's buffer: the
unit of growth is a *page group*, one page per layer buffer.

This module must never import torch, vLLM or CUDA: it is arithmetic, tested
on data (tests/test_kvplugin_geometry.py).
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024
PAGE_SIZE = 2 * MiB  # gpud's page: the CUDA driver's VMM granularity

_DTYPE_BYTES = {
    "bfloat16": 2, "bf16": 2, "float16": 2, "half": 2, "fp16": 2,
    "float32": 4, "float": 4, "fp32": 4,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "uint8": 1, "int8": 1,
}


class GeometryError(ValueError):
    """A KV layout the plugin does not back with pool pages (it says why)."""


def dtype_bytes(name: str) -> int:
    """Bytes per element of a KV dtype named as vLLM or torch name it ("bfloat16", "fp8")."""
    key = name.removeprefix("torch.").lower()
    try:
        return _DTYPE_BYTES[key]
    except KeyError:
        raise GeometryError(f"KV dtype {name!r} is not one the plugin knows") from None


def block_bytes(block_size: int, num_kv_heads: int, head_size: int, elem_bytes: int) -> int:
    """Bytes of one block of one layer: K and V for ``block_size`` tokens (vLLM's
    ``AttentionSpec.page_size_bytes`` without padding)."""
    for what, v in (("block_size", block_size), ("num_kv_heads", num_kv_heads),
                    ("head_size", head_size), ("dtype bytes", elem_bytes)):
        if v <= 0:
            raise GeometryError(f"{what} must be > 0, not {v}")
    return 2 * block_size * num_kv_heads * head_size * elem_bytes


@dataclass(frozen=True)
class KVGeometry:
    """One engine's KV cache laid over pool pages.

    ``block_bytes`` is P (bytes per block per layer buffer), ``num_tensors`` is R
    (layer buffers, one page each per group), ``num_blocks`` the virtual pool size
    (what ``--kv-cache-memory-bytes`` made vLLM compute), ``block_size`` tokens
    per block (for reporting only).
    """

    block_bytes: int
    num_tensors: int
    num_blocks: int
    block_size: int = 16
    page_size: int = PAGE_SIZE

    def __post_init__(self) -> None:
        if self.block_bytes <= 0 or self.num_tensors <= 0 or self.num_blocks <= 0:
            raise GeometryError(
                f"block bytes ({self.block_bytes}), layer buffers ({self.num_tensors}) and "
                f"blocks ({self.num_blocks}) must all be > 0"
            )
        if self.page_size % self.block_bytes:
            raise GeometryError(
                f"a KV block of {self.block_bytes} bytes per layer does not divide the "
                f"{self.page_size >> 20} MiB page (head size x KV heads not a power of two, "
                f"or padded pages): blocks would straddle pages; not supported yet"
            )

    @classmethod
    def from_spec(
        cls,
        *,
        block_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_size: int,
        dtype: str | int,
        kv_bytes: int,
        page_size: int = PAGE_SIZE,
    ) -> KVGeometry:
        """The geometry vLLM will build for ``kv_bytes`` of KV cache (``--kv-cache-memory-bytes``):
        ``num_blocks = kv_bytes // P // num_layers``, as ``kv_cache_utils.get_num_blocks``."""
        elem = dtype if isinstance(dtype, int) else dtype_bytes(dtype)
        p = block_bytes(block_size, num_kv_heads, head_size, elem)
        if num_layers <= 0:
            raise GeometryError(f"num_layers must be > 0, not {num_layers}")
        num_blocks = kv_bytes // p // num_layers
        if num_blocks <= 0:
            raise GeometryError(
                f"{kv_bytes} bytes of KV cache hold no block of {p * num_layers} bytes "
                f"({num_layers} layers)"
            )
        return cls(p, num_layers, num_blocks, block_size, page_size)

    # -- derived sizes -----------------------------------------------------------------

    @property
    def blocks_per_page(self) -> int:
        return self.page_size // self.block_bytes

    @property
    def blocks_per_group(self) -> int:
        """Blocks a page group makes usable: the same as a page holds (one page per buffer)."""
        return self.blocks_per_page

    @property
    def tokens_per_group(self) -> int:
        return self.blocks_per_group * self.block_size

    @property
    def group_bytes(self) -> int:
        """Device memory one page group takes: one page per layer buffer."""
        return self.page_size * self.num_tensors

    @property
    def num_groups(self) -> int:
        """Page groups that cover every block of the virtual pool (the last may be partial)."""
        return -(-self.num_blocks // self.blocks_per_group)

    @property
    def max_pages(self) -> int:
        """Pages this engine holds with every group mapped: what its kv_max should allow."""
        return self.num_groups * self.num_tensors

    @property
    def tensor_bytes(self) -> int:
        """vLLM's ``KVCacheTensor.size`` for one layer buffer."""
        return self.num_blocks * self.block_bytes

    @property
    def reserve_bytes(self) -> int:
        """Virtual range reserved per layer buffer: its size rounded up to whole pages."""
        return self.num_groups * self.page_size

    # -- blocks <-> groups <-> pages ---------------------------------------------------

    def group_of(self, block: int) -> int:
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} is outside 0..{self.num_blocks - 1}")
        return block // self.blocks_per_group

    def blocks_of(self, group: int) -> range:
        """Block ids in ``group`` (the last group may hold fewer)."""
        self._check_group(group)
        start = group * self.blocks_per_group
        return range(start, min(start + self.blocks_per_group, self.num_blocks))

    def page_offset(self, group: int) -> int:
        """Byte offset of ``group``'s page inside every layer buffer's range."""
        self._check_group(group)
        return group * self.page_size

    def groups_for(self, blocks: int) -> int:
        """Whole page groups needed for ``blocks`` more free blocks."""
        return -(-max(blocks, 0) // self.blocks_per_group)

    def describe(self) -> str:
        return (
            f"{self.num_blocks} blocks of {self.block_size} tokens, "
            f"{self.block_bytes >> 10} KiB per block per layer, {self.blocks_per_page} blocks "
            f"per {self.page_size >> 20} MiB page, groups of {self.num_tensors} pages "
            f"({self.group_bytes >> 20} MiB, {self.tokens_per_group} tokens), "
            f"{self.num_groups} groups at most"
        )

    def _check_group(self, group: int) -> None:
        if not 0 <= group < self.num_groups:
            raise IndexError(f"page group {group} is outside 0..{self.num_groups - 1}")
