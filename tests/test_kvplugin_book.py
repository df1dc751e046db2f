"""The plugin's block book: never a block in an unmapped group, give-back only of wholly
free groups, sleep returns every page (hypothesis state machine)."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gpud_vllm.book import BlockBook, BookError, GroupState
from gpud_vllm.geometry import KVGeometry

# 4 blocks per 2 MiB page (512 KiB blocks), 3 layer buffers, 22 blocks -> 6 groups.
GEO = KVGeometry(block_bytes=512 * 1024, num_tensors=3, num_blocks=22)


def test_starts_with_group_zero_minus_the_null_block() -> None:
    book = BlockBook(GEO)
    assert book.mapped_groups == [0] and book.free_blocks == 3
    assert book.free_ids() == [1, 2, 3]
    with pytest.raises(BookError, match="null block"):
        book.take([0])
    with pytest.raises(BookError, match="unmapped"):
        book.take([4])


def test_give_back_only_wholly_free_groups_and_never_group_zero() -> None:
    book = BlockBook(GEO)
    assert book.mapped([1, 2]) == [4, 5, 6, 7, 8, 9, 10, 11]
    book.take([5])
    assert book.wholly_free() == [2]
    with pytest.raises(BookError, match="wholly free"):
        book.retire([1])
    with pytest.raises(BookError, match="null block"):
        book.retire([0])
    assert book.retire([2]) == [8, 9, 10, 11]
    with pytest.raises(BookError, match="retiring"):
        book.take([8])
    assert book.retired([2]) == [2]
    assert book.groups(GroupState.UNMAPPED) == [2, 3, 4, 5]


def test_a_growing_group_is_neither_free_nor_grown_twice() -> None:
    book = BlockBook(GEO)
    assert book.grow_into([1, 2]) == [1, 2]
    assert book.unmapped_groups(2) == [3, 4] and book.free_blocks == 3
    with pytest.raises(BookError, match="growing"):
        book.take([5])
    with pytest.raises(BookError, match="not unmapped"):
        book.grow_into([2])
    assert book.mapped([1]) == [4, 5, 6, 7]
    book.growth_failed([2])
    assert book.groups(GroupState.UNMAPPED) == [2, 3, 4, 5] and book.growing_groups == []
    book.check()


def test_last_group_may_be_partial() -> None:
    book = BlockBook(GEO)
    assert book.mapped([5]) == [20, 21]


class BookMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.book = BlockBook(GEO)
        self.used: set[int] = set()
        self.pages_out: set[int] = {0}  # groups whose pages the engine holds

    @precondition(lambda self: not self.book.asleep)
    @rule(k=st.integers(1, 3))
    def grow(self, k: int) -> None:
        groups = self.book.unmapped_groups(k)
        fresh = self.book.mapped(groups)
        self.pages_out |= set(groups)
        assert all(GEO.group_of(b) in groups for b in fresh)

    @precondition(lambda self: not self.book.asleep)
    @rule(data=st.data())
    def take(self, data: st.DataObject) -> None:
        free = self.book.free_ids()
        if not free:
            return
        picked = data.draw(st.lists(st.sampled_from(free), min_size=1, max_size=5, unique=True))
        self.book.take(picked)
        self.used |= set(picked)

    @rule(data=st.data())
    def take_anything(self, data: st.DataObject) -> None:
        block = data.draw(st.integers(0, GEO.num_blocks - 1))
        if self.book.usable(block) and block not in self.used:
            self.book.take([block])
            self.used.add(block)
        else:
            with pytest.raises(BookError):
                self.book.take([block])

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if not self.used:
            return
        picked = data.draw(st.lists(st.sampled_from(sorted(self.used)), min_size=1,
                                    unique=True))
        self.book.release(picked)
        self.used -= set(picked)

    @precondition(lambda self: not self.book.asleep)
    @rule(k=st.integers(0, 6))
    def give_back(self, k: int) -> None:
        groups = self.book.wholly_free(k)
        for g in groups:
            assert g != 0
            assert not any(GEO.group_of(b) == g for b in self.used)
        blocks = self.book.retire(groups)
        assert not set(blocks) & self.used
        self.book.retired(groups)
        self.pages_out -= set(groups)

    @precondition(lambda self: not self.book.asleep)
    @rule()
    def sleep(self) -> None:
        self.book.release(sorted(self.used))  # vLLM aborts every request first
        self.used.clear()
        self.book.sleep()
        self.book.retired(self.book.held_groups)
        self.pages_out.clear()
        assert self.book.held_groups == [] and self.book.free_blocks == 0

    @precondition(lambda self: self.book.asleep)
    @rule()
    def wake(self) -> None:
        assert self.book.wake() == [1, 2, 3]
        self.pages_out = {0}

    @invariant()
    def consistent(self) -> None:
        self.book.check()
        assert set(self.book.held_groups) == self.pages_out
        assert {GEO.group_of(b) for b in self.used} <= set(self.book.mapped_groups)


TestBookMachine = BookMachine.TestCase
TestBookMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_sleep_with_blocks_in_use_is_a_bug() -> None:
    book = BlockBook(GEO)
    book.take([1])
    with pytest.raises(BookError, match="still in use"):
        book.sleep()


def test_group_counts_follow_every_transition() -> None:
    """The scheduler reads these counts on every allocation (O(1), no scan of the groups)."""
    book = BlockBook(GEO)
    book.grow_into([1, 2])
    assert (book.count(GroupState.MAPPED), book.count(GroupState.GROWING)) == (1, 2)
    book.mapped([1])
    book.growth_failed([2])
    book.retire([1])
    assert [book.count(s) for s in GroupState] == [4, 0, 1, 1]  # unmapped, growing, ...
    book.retired([1])
    assert book.count(GroupState.UNMAPPED) == 5 and book.count(GroupState.MAPPED) == 1
    book.check()
