"""Shared-memory arenas and block lifetimes (transport.shm), without interpreters.

An :class:`Arena` hands out aligned blocks of one segment: small blocks come
from power-of-two size classes, large ones first-fit with neighbours coalesced
on free, and the segment doubles when nothing fits.  :class:`BlockViews` calls
back once the last view of a block is gone.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multipy.transport.shm import ALIGN, SMALL, Arena, BlockViews, Segment

KIB = 1024


@pytest.fixture
def arena():
    segment = Segment.create(1 << 20)
    yield Arena(segment)
    segment.close()


# -- size classes ---------------------------------------------------------------
def test_a_freed_small_block_is_reused_by_the_next_block_of_its_class(arena):
    a = arena.alloc(100)
    arena.free(a)
    assert arena.alloc(120) == a  # 100 and 120 bytes share the 128-byte class


def test_a_freed_small_block_is_not_handed_out_for_another_class(arena):
    a = arena.alloc(100)      # 128-byte class
    arena.free(a)
    b = arena.alloc(1000)     # 1 KiB class
    assert b != a
    assert arena.alloc(64) != a  # a 64-byte block does not take a 128-byte slot either
    assert arena.alloc(128) == a


def test_blocks_are_aligned_and_never_overlap(arena):
    sizes = [1, 63, 64, 65, 1000, 4 * KIB, SMALL, SMALL + 1, 200 * KIB]
    blocks = [(arena.alloc(n), n) for n in sizes]
    assert all(off % ALIGN == 0 for off, _ in blocks)
    spans = sorted(blocks)
    assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:]))


# -- coalescing -------------------------------------------------------------------
def test_freed_neighbouring_large_blocks_coalesce_into_one(arena):
    big = 128 * KIB
    a, b, c = arena.alloc(big), arena.alloc(big), arena.alloc(big)
    assert (b - a, c - b) == (big, big)
    arena.free(a)
    arena.free(b)  # b joins a: one free run of 2 x big at a
    assert arena.alloc(2 * big) == a
    arena.free(c)


def test_a_large_block_freed_between_used_ones_is_reused_in_place(arena):
    big = 96 * KIB
    a, b, c = arena.alloc(big), arena.alloc(big), arena.alloc(big)
    arena.free(b)
    assert arena.alloc(big) == b
    assert a < b < c


# -- growth -----------------------------------------------------------------------
def test_the_segment_grows_when_nothing_fits_and_keeps_what_was_written(arena):
    segment = arena.segment
    size = segment.size
    first = arena.alloc(size // 2)
    segment.view(first, 4)[:] = [1, 2, 3, 4]
    second = arena.alloc(size)  # cannot fit: the segment doubles (at least)
    assert segment.size >= 2 * size
    assert second + size <= segment.size
    assert list(segment.view(first, 4)) == [1, 2, 3, 4]
    segment.view(second + size - 1, 1)[:] = 9  # the new tail is mapped and writable


# -- double free ------------------------------------------------------------------
@pytest.mark.parametrize("nbytes", [100, 200 * KIB], ids=["small", "large"])
def test_a_block_freed_twice_is_handed_out_only_once(arena, nbytes):
    a = arena.alloc(nbytes)
    arena.free(a)
    arena.free(a)  # ignored: the block is already free
    first, second = arena.alloc(nbytes), arena.alloc(nbytes)
    assert first != second


def test_freeing_an_offset_that_was_never_allocated_changes_nothing(arena):
    a = arena.alloc(100)
    arena.free(a + ALIGN)
    assert arena.alloc(100) != a  # a is still in use


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300 * KIB), st.booleans()), max_size=40))
def test_live_blocks_never_overlap_whatever_the_order_of_allocs_and_frees(ops):
    segment = Segment.create(1 << 16)
    arena = Arena(segment)
    live: dict[int, int] = {}
    try:
        for nbytes, free_one in ops:
            if free_one and live:
                off = next(iter(live))
                arena.free(off)
                del live[off]
            off = arena.alloc(nbytes)
            assert off not in live
            live[off] = nbytes
            assert off + nbytes <= segment.size
        spans = sorted(live.items())
        assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:]))
    finally:
        segment.close()


# -- block views ------------------------------------------------------------------
def test_the_callback_runs_once_when_the_last_view_of_a_block_dies():
    released = []
    views = BlockViews(released.append)
    first, second = np.zeros(4), np.zeros(4)
    views.add(64, first)
    views.add(64, second)
    assert 64 in views
    del first
    gc.collect()
    assert released == [] and 64 in views  # one view is still alive
    del second
    gc.collect()
    views.settle()
    assert released == [64] and 64 not in views


def test_blocks_are_released_independently():
    released = []
    views = BlockViews(released.append)
    a, b = np.zeros(1), np.zeros(1)
    views.add(0, a)
    views.add(128, b)
    del b
    gc.collect()
    assert 0 in views and released == [128]  # asking settles
    del a
    gc.collect()
    views.settle()
    assert released == [128, 0]


def test_a_death_is_recorded_and_applied_by_the_next_settle():
    # A holder may die in any thread, inside any code: its death only records
    # its reference (no Python code runs); settle() or a lookup applies it.
    released = []
    views = BlockViews(released.append)
    holder = np.zeros(2)
    views.add(192, holder)
    del holder
    gc.collect()
    assert released == [] and len(views.pending) == 1
    assert 192 not in views and released == [192] and not views.pending
    views.settle()
    assert released == [192]  # applied once
