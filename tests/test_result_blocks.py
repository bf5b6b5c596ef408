"""The books of the arena blocks that the host's result tensors view.

A result tensor of the process backend views an arena block: a block of the
interpreter's results arena (reported free with the next request once the
tensor died) or, for an argument handed back in place, a block of the host's
own arguments arena (free again once no tensor views it, its call has ended and
the interpreter does not keep it).  With the extension, a tensor's holder tells
the books of its own death (``multipy._native.HeldBlocks``, and the decoder's
``released``); ``shm.HeldBlocksPy`` is the pure-Python twin.  Both are checked
on their own here, then through a manager: a result kept past many calls keeps
its data, dropped results leave no block in use.
"""

from __future__ import annotations

import gc
import threading

import numpy
import pytest
import torch

import multipy
from _wait import wait_for
from multipy.transport import shm
from multipy.transport.shm import Arena, HeldBlocksPy, Segment

try:
    from multipy import _native
except ImportError:
    _native = None

_SOURCE = '''
def same(x):
    return x

def twice(x):
    return x * 2

def pair(x):
    return x, x * 2

def corrupt(kind, x):
    """Hand x back in a reply corrupted the way ``kind`` says (once)."""
    import multipy.backends._process_main as serving

    original = serving.encode_reply

    def bad(call, value, *rest):
        serving.encode_reply = original
        data = bytearray(original(call, value, *rest))
        if kind == "call":
            data[0] ^= 0xFF          # answers another call
        elif kind == "flags":
            data[9] |= 0x80          # a flag nobody knows
        elif kind == "counts":
            data[10:12] = bytes((255, 255))  # more pinned blocks than the reply holds
        elif kind == "dtype":
            data[16 + 3] = 200       # the tensor item's dtype code (value at 16: tag, item)
        elif kind == "length":
            del data[-3:]            # the tensor item cut short
        return bytes(data)

    serving.encode_reply = bad
    return x
'''


@pytest.fixture(params=["native", "python"])
def books(request):
    """``(arena, pins, held)``: an arguments arena and its books, either kind."""
    arena = Arena(Segment.create(1 << 20))
    pins: set[int] = set()
    if request.param == "python":
        return arena, pins, HeldBlocksPy(arena, pins, threading.RLock())
    if _native is None:
        pytest.skip("multipy._native is not built here (no C compiler at install time)")
    return arena, pins, _native.held_blocks(arena, pins)


def _settled(held):
    held.settle()  # what the next request does
    return held


def test_a_viewed_block_is_freed_when_its_call_ended_and_its_last_view_died(books):
    arena, _, held = books
    block = arena.alloc(64)
    first, second = numpy.zeros(8), numpy.zeros(8)  # what result tensors keep alive
    held.add(block, first)
    held.add(block, second)
    held.release([block])  # the call ended: still viewed
    assert block in held and block in arena._used
    del first
    gc.collect()
    assert block in _settled(held) and block in arena._used
    del second
    gc.collect()
    assert block not in _settled(held)
    assert block not in arena._used
    assert arena.alloc(64) == block  # reused


def test_a_block_the_interpreter_keeps_is_freed_once_unpinned(books):
    arena, pins, held = books
    block = arena.alloc(64)
    held.release([block], [block])  # the interpreter keeps the argument
    assert block in pins and block in arena._used
    holder = numpy.zeros(8)
    held.add(block, holder)  # a later result views it too
    held.release((), (), [block])  # the interpreter let it go: still viewed
    assert block not in pins and block in arena._used
    del holder
    gc.collect()
    _settled(held)
    assert block not in arena._used


def test_a_large_block_waits_for_settle(books):
    arena, _, held = books
    block = arena.alloc(shm.SMALL + 1)
    holder = numpy.zeros(8)
    held.add(block, holder)
    held.release([block])
    del holder
    gc.collect()
    assert block in arena._used  # a death never takes the arena's lock
    assert held.pending
    held.settle()
    assert block not in arena._used and not held.pending


def test_a_block_whose_last_view_died_and_that_its_call_pins_is_kept(books):
    # The interpreter keeps the argument (pinned) that a result viewed and that
    # died before the call's release: the pins are counted before the deaths are
    # settled, so the block stays in use (the other order freed it while kept).
    arena, pins, held = books
    block = arena.alloc(shm.SMALL + 1)  # larger than a size class: its death waits for settle
    holder = numpy.zeros(8)
    held.add(block, holder)
    del holder
    gc.collect()
    held.release([block], [block])
    assert block in pins and block in arena._used
    held.release((), (), [block])  # the interpreter let it go
    assert block not in arena._used


def test_a_holder_that_cannot_be_watched_is_not_counted(books):
    arena, _, held = books
    block = arena.alloc(64)
    kept = numpy.zeros(8)
    held.add(block, kept)
    with pytest.raises(TypeError):
        held.add(block, 5)  # no weak reference to an int: its death could not be told
    del kept
    gc.collect()
    held.release([block])  # the one view that was counted died: free
    assert block not in _settled(held) and block not in arena._used


@pytest.fixture(scope="module")
def blocks(manager):
    """``(same, twice, pair)``: replicated functions of a module in every interpreter."""
    manager.register_module_source("_result_blocks", _SOURCE)
    with manager.acquire_one() as s:
        return tuple(s.create_movable(s.global_("_result_blocks", name))
                     for name in ("same", "twice", "pair", "corrupt"))


def _no_block_held(manager) -> None:
    """The process backend's books are empty: no argument block viewed, none in use
    but those the interpreter still keeps (released with a later reply)."""
    if manager.backend != "process":
        return
    for worker in manager._workers:
        worker._held.settle()
        assert worker._held.viewed == {}
        assert set(worker._args._used) <= worker._pins


def test_a_result_kept_past_many_calls_keeps_its_data(manager, blocks):
    same, twice, pair, _ = blocks
    x = torch.arange(16.0).reshape(1, 16)
    kept_same, kept_twice = same(x.clone()), twice(x)
    kept_pair = pair(x + 1)
    for i in range(500):
        y = torch.full((1, 16), float(i))
        assert torch.equal(same(y), y)
        assert torch.equal(twice(y), y * 2)
    gc.collect()
    assert torch.equal(kept_same, x)
    assert torch.equal(kept_twice, x * 2)
    assert torch.equal(kept_pair[0], x + 1) and torch.equal(kept_pair[1], (x + 1) * 2)


def test_dropped_results_leave_no_block_in_use(manager, blocks):
    same, twice, pair, _ = blocks
    x = torch.randn(1, 16)
    addresses = set()
    for _ in range(2000):
        t = twice(x)
        addresses.add(t.data_ptr())  # a block of the interpreter's results arena
        del t
        same(x)
        pair(x)
    if manager.backend == "process":
        # Each dead result's block was reported and used again: a handful of blocks,
        # not one per call (the arena would grow without the reports).
        assert len(addresses) <= 8
    big = torch.randn(300, 300)  # a block larger than 64 KiB, handed back in place
    for _ in range(20):
        assert same(big).shape == (300, 300)
    same(x)
    _no_block_held(manager)


def test_results_dropped_on_other_threads_are_freed(manager, blocks):
    same, twice, pair, _ = blocks
    x = torch.randn(1, 16)
    results = [r for _ in range(200) for r in (same(x), twice(x), *pair(x))]
    done = threading.Event()

    def drop():
        results.clear()
        done.set()

    threading.Thread(target=drop).start()
    assert done.wait(60)
    gc.collect()
    same(x)
    _no_block_held(manager)
    assert torch.equal(twice(x), x * 2)



@pytest.mark.parametrize("kind", ["call", "flags", "counts", "dtype", "length"])
def test_a_corrupt_reply_is_a_transport_error_and_leaves_the_manager_usable(manager, blocks, kind):
    if manager.backend != "process":
        pytest.skip("only the process backend reads replies from bytes")
    same, twice, _, corrupt = blocks
    x = torch.arange(16.0).reshape(1, 16)
    with pytest.raises(multipy.TransportError):
        corrupt(kind, x)
    # Its interpreter is restarted (a corrupt header) or still in step (a corrupt value).
    wait_for(lambda: all(w.available for w in manager._workers), "the interpreter to be back")
    for _ in range(3):
        assert torch.equal(same(x), x) and torch.equal(twice(x), x * 2)
    gc.collect()
    same(x)
    _no_block_held(manager)


def test_a_corrupt_posted_reply_fails_only_its_own_call(backend):
    # Posted calls are collected by the completion thread (in C for the common
    # reply): a corrupt one is a TransportError for its own future; the calls
    # posted before it get their own answers, those after it their own answers or
    # (its interpreter restarted under them) an error of their own.  One
    # interpreter, so that the corrupting call's reply is the one corrupted.
    if backend != "process":
        pytest.skip("only the process backend reads replies from bytes")
    with multipy.InterpreterManager(1, backend="process") as manager:
        manager.register_module_source("_result_blocks", _SOURCE)
        with manager.acquire_one() as s:
            same, twice, corrupt = (s.create_movable(s.global_("_result_blocks", name))
                                    for name in ("same", "twice", "corrupt"))
        xs = [torch.full((1, 16), float(i)) for i in range(6)]
        for kind in ("call", "flags", "counts", "dtype", "length"):
            for x in xs:  # loaded and answered by the interpreter serving now
                assert torch.equal(twice(x), x * 2) and torch.equal(corrupt("none", x), x)
            before = [twice.submit(x) for x in xs[:3]]
            bad = corrupt.submit(kind, xs[0])
            after = [twice.submit(x) for x in xs[3:]]
            with pytest.raises(multipy.TransportError):
                bad.result(timeout=60)
            for x, future in zip(xs[:3], before):
                assert torch.equal(future.result(timeout=60), x * 2)
            for x, future in zip(xs[3:], after):
                try:
                    assert torch.equal(future.result(timeout=60), x * 2)
                except multipy.InterpreterCrashedError:
                    assert kind != "dtype"  # (a corrupt value leaves the interpreter in step)
            wait_for(lambda: manager._workers[0].available, "the interpreter to be back")
            assert all(torch.equal(f.result(timeout=60), x * 2)
                       for x, f in [(x, twice.submit(x)) for x in xs])
            gc.collect()
            same(xs[0])
            _no_block_held(manager)
