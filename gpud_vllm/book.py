"""Which page groups of one engine's KV cache are mapped, and which of their blocks are used.

The pure state machine behind the plugin's block pool. vLLM's ``BlockPool``
keeps choosing blocks (its free queue, its prefix-cache order); this book
says which blocks may be in that queue at all: only blocks of *mapped*
groups, never block 0 (vLLM's null block), never blocks of a group on its
way out. It also decides which groups can be given back: only wholly free
ones, and never group 0 while awake (it holds the null block, which padded
block-table slots read).

A group's life: ``unmapped -> growing -> mapped -> retiring -> unmapped``.
``growing`` covers the time while its pages are being asked from gpud and
mapped off the scheduler's thread (``grow_into``, then ``mapped`` or
``growth_failed``); ``retiring`` the time between taking a group's blocks
out of the free queue and the GPU being done with them (the caller's
fence); its pages go back to gpud only after ``retired``.

This module must never import torch, vLLM, CUDA or sockets: it is tested on
data with hypothesis (tests/test_kvplugin_book.py).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from gpud_vllm.geometry import KVGeometry

NULL_BLOCK = 0


class BookError(RuntimeError):
    """An operation that would hand out unmapped memory or lose track of a block."""


class GroupState(enum.Enum):
    UNMAPPED = "unmapped"
    GROWING = "growing"
    MAPPED = "mapped"
    RETIRING = "retiring"


class BlockBook:
    """Mapped groups and used blocks of one engine; starts with group 0 mapped."""

    def __init__(self, geometry: KVGeometry, *, first_mapped: bool = True) -> None:
        self.geometry = geometry
        self.state = [GroupState.UNMAPPED] * geometry.num_groups
        # Groups per state, kept with every change: the scheduler's path asks for these
        # counts on every allocation, and a scan of every group there costs it latency.
        self._count = dict.fromkeys(GroupState, 0)
        self._count[GroupState.UNMAPPED] = geometry.num_groups
        self.used_in = [0] * geometry.num_groups
        self._used: set[int] = set()
        self._free = 0
        self.asleep = False
        if first_mapped:
            self.mapped([0])

    # -- queries ---------------------------------------------------------------------

    def count(self, state: GroupState) -> int:
        """How many groups are in ``state`` (O(1))."""
        return self._count[state]

    @property
    def free_blocks(self) -> int:
        """Blocks vLLM may hand out now without asking gpud (mapped, unused, not null)."""
        return self._free

    @property
    def used_blocks(self) -> int:
        return len(self._used)

    def groups(self, state: GroupState) -> list[int]:
        return [g for g, s in enumerate(self.state) if s is state]

    @property
    def mapped_groups(self) -> list[int]:
        return self.groups(GroupState.MAPPED)

    @property
    def held_groups(self) -> list[int]:
        """Groups whose pages this engine still holds (mapped or retiring)."""
        return [g for g, s in enumerate(self.state)
                if s is GroupState.MAPPED or s is GroupState.RETIRING]

    @property
    def growing_groups(self) -> list[int]:
        return self.groups(GroupState.GROWING)

    def usable(self, block: int) -> bool:
        g = self.geometry.group_of(block)
        return self.state[g] is GroupState.MAPPED and block != NULL_BLOCK

    def free_ids(self) -> list[int]:
        """Every block vLLM's free queue may hold now (O(blocks): checks and tests)."""
        return [
            b
            for g in self.mapped_groups
            for b in self.geometry.blocks_of(g)
            if b != NULL_BLOCK and b not in self._used
        ]

    def unmapped_groups(self, k: int) -> list[int]:
        """Up to ``k`` unmapped groups to grow into, lowest first (blocks near the front)."""
        if self.asleep:
            raise BookError("the engine is asleep: wake it (group 0) before it grows")
        out: list[int] = []
        for g, s in enumerate(self.state):
            if len(out) >= k:
                break
            if s is GroupState.UNMAPPED:
                out.append(g)
        return out

    def wholly_free(self, limit: int | None = None) -> list[int]:
        """Mapped groups with no used block that may be given back, highest first.

        Group 0 is never among them: it holds the null block while awake.
        """
        out: list[int] = []
        for g in range(len(self.state) - 1, 0, -1):
            if limit is not None and len(out) >= limit:
                break
            if self.state[g] is GroupState.MAPPED and self.used_in[g] == 0:
                out.append(g)
        return out

    # -- transitions -------------------------------------------------------------------

    def _set(self, g: int, state: GroupState) -> None:
        self._count[self.state[g]] -= 1
        self._count[state] += 1
        self.state[g] = state

    def grow_into(self, groups: Iterable[int]) -> list[int]:
        """Unmapped groups whose pages are being asked for and mapped (off this thread)."""
        out = list(groups)
        for g in out:
            if self.state[g] is not GroupState.UNMAPPED:
                raise BookError(f"page group {g} is {self.state[g].value}, not unmapped")
            if self.asleep:
                raise BookError(f"page group {g} grown while the engine is asleep")
        for g in out:
            self._set(g, GroupState.GROWING)
        return out

    def growth_failed(self, groups: Iterable[int]) -> None:
        """gpud lent too little for ``groups``: they are unmapped again."""
        for g in groups:
            if self.state[g] is not GroupState.GROWING:
                raise BookError(f"page group {g} is {self.state[g].value}, not growing")
            self._set(g, GroupState.UNMAPPED)

    def mapped(self, groups: Iterable[int]) -> list[int]:
        """Record that ``groups`` (unmapped, or growing) are mapped now; returns their blocks
        that became free."""
        fresh: list[int] = []
        for g in groups:
            if self.state[g] not in (GroupState.UNMAPPED, GroupState.GROWING):
                raise BookError(f"page group {g} is {self.state[g].value}, not unmapped")
            if self.asleep:
                raise BookError(f"page group {g} mapped while the engine is asleep")
            self._set(g, GroupState.MAPPED)
            blocks = [b for b in self.geometry.blocks_of(g) if b != NULL_BLOCK]
            self._free += len(blocks)
            fresh.extend(blocks)
        return fresh

    def take(self, blocks: Iterable[int]) -> None:
        """Blocks leave the free queue for a request (new, or a prefix-cache hit revived)."""
        for b in blocks:
            g = self.geometry.group_of(b)
            if b == NULL_BLOCK:
                raise BookError("block 0 is vLLM's null block; it is never handed out")
            if self.state[g] is not GroupState.MAPPED:
                raise BookError(
                    f"block {b} of page group {g} handed out while the group is "
                    f"{self.state[g].value}: its memory is not this engine's"
                )
            if b in self._used:
                raise BookError(f"block {b} handed out twice")
            self._used.add(b)
            self.used_in[g] += 1
            self._free -= 1

    def release(self, blocks: Iterable[int]) -> None:
        """Blocks are back in the free queue (their ref count reached 0); they stay mapped."""
        for b in blocks:
            if b not in self._used:
                raise BookError(f"block {b} freed but it was not in use")
            self._used.remove(b)
            self.used_in[self.geometry.group_of(b)] -= 1
            self._free += 1

    def retire(self, groups: Iterable[int]) -> list[int]:
        """Take wholly free groups out of service; returns their blocks, which the caller
        removes from vLLM's free queue now and unmaps once the GPU is done with them."""
        out: list[int] = []
        for g in groups:
            if self.state[g] is not GroupState.MAPPED:
                raise BookError(f"page group {g} is {self.state[g].value}, not mapped")
            if self.used_in[g]:
                raise BookError(
                    f"page group {g} still has {self.used_in[g]} used blocks: only wholly "
                    f"free groups go back"
                )
            if g == 0 and not self.asleep:
                raise BookError("page group 0 holds the null block: it stays while awake")
            self._set(g, GroupState.RETIRING)
            blocks = [b for b in self.geometry.blocks_of(g) if b != NULL_BLOCK]
            self._free -= len(blocks)
            out.extend(blocks)
        return out

    def retired(self, groups: Iterable[int]) -> list[int]:
        """The GPU is done with ``groups`` and they are unmapped: their pages go back."""
        done: list[int] = []
        for g in groups:
            if self.state[g] is not GroupState.RETIRING:
                raise BookError(f"page group {g} is {self.state[g].value}, not retiring")
            self._set(g, GroupState.UNMAPPED)
            done.append(g)
        return done

    def sleep(self) -> list[int]:
        """Every group goes (group 0 too): returns the blocks to drop from the free queue.

        vLLM has aborted every request before it sleeps, so no block may be in use.
        Follow with ``retired(held_groups)`` once they are unmapped.
        """
        if self._used:
            raise BookError(
                f"{len(self._used)} blocks are still in use at sleep "
                f"(first: {sorted(self._used)[:8]}): vLLM should have aborted every request"
            )
        if self.growing_groups:
            raise BookError(f"page groups {self.growing_groups} are still growing at sleep")
        self.asleep = True
        return self.retire(self.mapped_groups)

    def wake(self) -> list[int]:
        """After sleep: group 0 comes back first. Returns its blocks that became free."""
        if not self.asleep:
            raise BookError("wake without sleep")
        if self.held_groups or self.growing_groups:
            raise BookError(f"page groups {self.held_groups} were not unmapped at sleep")
        self.asleep = False
        return self.mapped([0])

    def check(self) -> None:
        """The invariants, in full (tests; cheap enough for a debug flag)."""
        counts = [0] * len(self.state)
        for b in self._used:
            g = self.geometry.group_of(b)
            if self.state[g] is not GroupState.MAPPED:
                raise BookError(f"used block {b} in group {g}, which is {self.state[g].value}")
            counts[g] += 1
        if counts != self.used_in:
            raise BookError("per-group used counts drifted from the used blocks")
        if any(self._count[s] != len(self.groups(s)) for s in GroupState):
            raise BookError("per-state group counts drifted from the groups' states")
        if self._free != len(self.free_ids()):
            raise BookError(f"free count {self._free} != {len(self.free_ids())} free blocks")
        if not self.asleep and self.state[0] is not GroupState.MAPPED:
            raise BookError("awake with page group 0 not mapped")
