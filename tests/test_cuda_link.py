"""The CUDA link protocol (transport.cuda_link), checked without a GPU.

The link's device operations go through an ``ops`` object; here a CPU stand-in
logs every event record and wait, so these tests check what the GPU run cannot
show directly: which side waits for which event before touching a buffer, that
blocks never overlap within a message, that buffers grow between calls and are
announced once, and that each side keeps copies, never views of the buffers.
The host and the interpreter side run in one process, as one call would run
across two.  tests/test_cuda.py runs the same path on a real GPU.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multipy.transport import cuda_link
from multipy.transport.cuda_link import (LINK_ALIGN, LINK_MIN_BYTES, HostLinks, InterpreterLinks)

EVENT_NAMES = ("args_written", "results_read", "worker_done")


class FakeEvent:
    def __init__(self, name: str) -> None:
        self.name = name


class FakeOps:
    """CPU stand-in for CudaOps: buffers are CPU tensors shared in-process, and
    every event operation is appended to ``log`` as ``(side, action, event)``."""

    def __init__(self, log: list, side: str) -> None:
        self.log = log
        self.side = side
        self._names = itertools.cycle(EVENT_NAMES)

    def buffer(self, nbytes):
        self.log.append((self.side, "buffer", nbytes))
        return torch.zeros(nbytes, dtype=torch.uint8)

    def share(self, buffer):
        return ("shared", buffer)

    def open(self, shared):
        self.log.append((self.side, "open", shared[1].numel()))
        return shared[1]

    def event(self):
        return FakeEvent(next(self._names))

    def share_event(self, event):
        return event

    def open_event(self, handle):
        return handle

    def record(self, event):
        self.log.append((self.side, "record", event.name))

    def wait(self, event):
        self.log.append((self.side, "wait", event.name))

    def finish(self, event):
        self.log.append((self.side, "finish", event.name))

    def drain(self):
        self.log.append((self.side, "drain", None))

    def empty(self, shape, dtype):
        return torch.empty(shape, dtype=dtype)


class Pair:
    """A host and an interpreter side of one link, and one call between them."""

    def __init__(self) -> None:
        self.log: list = []
        self.host = HostLinks(lambda index: FakeOps(self.log, "host"))
        self.interp = InterpreterLinks(lambda index: FakeOps(self.log, "interp"))
        self.crossed: list[str] = []  # per tensor of the last call: "link" or "ipc"

    def announce(self) -> tuple:
        announcements = self.host.announcements()
        if announcements:
            self.interp.update(announcements)
        return announcements

    def call(self, args, fn=lambda *a: a):
        """Send ``args``, run ``fn`` on the interpreter's copies, bring back its results."""
        self.announce()
        self.crossed = []
        descs = [self.host.place(a) for a in args]
        self.host.sent()
        inside = [self.interp.take(d) if d else a.clone() for d, a in zip(descs, args)]
        self.crossed += ["link" if d else "ipc" for d in descs]
        self.inside = inside
        results = fn(*inside)
        rdescs = [self.interp.place(r) for r in results]
        self.interp.done()
        out = []
        for d, r in zip(rdescs, results):
            if d:
                out.append(self.host.take(d))
            else:
                self.host.fell_back(r)
                out.append(r.clone())
        self.crossed += ["link" if d else "ipc" for d in rdescs]
        self.host.received()
        return out

    def link_buffers(self):
        link = self.host._links[None]
        return link.args, link.results


def _inside(t, buffer) -> bool:
    start = buffer.data_ptr()
    return start <= t.data_ptr() < start + buffer.numel()


def test_the_first_tensor_on_a_device_crosses_by_ipc_and_makes_the_link():
    pair = Pair()
    x = torch.arange(6.0).reshape(2, 3)
    (out,) = pair.call([x], lambda a: (a * 2,))
    assert pair.crossed == ["ipc", "ipc"]
    torch.testing.assert_close(out, x * 2)
    announcements = pair.announce()
    assert [index for index, _ in announcements] == [None]
    assert set(announcements[0][1]) == {"args", "results", "events"}
    (out,) = pair.call([x], lambda a: (a * 3,))
    assert pair.crossed == ["link", "link"]
    torch.testing.assert_close(out, x * 3)
    assert pair.announce() == ()  # announced once


def test_every_buffer_access_waits_for_the_other_side():
    pair = Pair()
    x = torch.ones(4)
    pair.call([x])
    pair.announce()
    pair.log.clear()
    pair.call([x], lambda a: (a + 1,))
    assert [entry for entry in pair.log if entry[1] in ("wait", "record")] == [
        ("host", "wait", "worker_done"),      # the interpreter finished reading the last args
        ("host", "record", "args_written"),
        ("interp", "wait", "args_written"),   # before it clones its arguments
        ("interp", "wait", "results_read"),   # the host cloned the last results
        ("interp", "record", "worker_done"),
        ("host", "wait", "worker_done"),      # before the host clones the results
        ("host", "record", "results_read"),
    ]


def test_a_call_without_tensors_touches_no_event():
    pair = Pair()
    pair.call([torch.ones(2)])
    pair.announce()
    pair.log.clear()
    assert pair.call([], lambda: ()) == []
    assert pair.log == []


def test_each_side_keeps_copies_not_views_of_the_buffers():
    pair = Pair()
    x = torch.arange(8.0)
    pair.call([x])
    (out,) = pair.call([x], lambda a: (a + 1,))
    args, results = pair.link_buffers()
    (inside,) = pair.inside
    assert not _inside(inside, args)
    assert not _inside(out, results)
    inside.zero_()  # the interpreter may keep and change its argument
    args.zero_()    # and the next call reuses the buffers
    results.zero_()
    torch.testing.assert_close(out, x + 1)


def test_blocks_of_one_message_are_aligned_and_disjoint_and_reused_by_the_next():
    pair = Pair()
    xs = [torch.ones(n) for n in (1, 100, 3, 1000)]
    pair.call(xs)
    pair.announce()

    def offsets():
        descs = [pair.host.place(x) for x in xs]
        pair.host.sent()
        return [(d[2], d[3]) for d in descs]

    first = offsets()
    assert all(off % LINK_ALIGN == 0 for off, _ in first)
    spans = sorted(first)
    assert all(a_off + a_n <= b_off for (a_off, a_n), (b_off, _) in zip(spans, spans[1:]))
    assert offsets() == first


def test_arguments_that_outgrow_the_buffer_grow_it_between_calls():
    pair = Pair()
    small = torch.ones(4)
    pair.call([small])
    big = torch.ones(3 * LINK_MIN_BYTES // 4, dtype=torch.float32)  # 3 MiB
    (out,) = pair.call([small, big], lambda a, b: (b.sum().reshape(1),))
    assert pair.crossed[:2] == ["link", "ipc"]
    pair.log.clear()
    announcements = pair.announce()
    assert set(announcements[0][1]) == {"args"}
    # The old buffer goes only after both sides are done with it.
    assert pair.log.index(("host", "finish", "worker_done")) < pair.log.index(("host", "buffer", 8 * LINK_MIN_BYTES))
    assert ("host", "drain", None) in pair.log
    assert ("interp", "drain", None) in pair.log  # before the interpreter drops its old mapping
    (out,) = pair.call([small, big], lambda a, b: (b.sum().reshape(1),))
    assert pair.crossed == ["link", "link", "link"]
    assert float(out) == big.numel()


def test_results_that_outgrow_the_buffer_grow_it_between_calls():
    pair = Pair()
    x = torch.ones(2)
    pair.call([x])
    make = lambda a: (a.new_ones(LINK_MIN_BYTES // 2), a.new_ones(LINK_MIN_BYTES // 2))  # 2 × 2 MiB
    outs = pair.call([x], make)
    assert pair.crossed == ["link", "ipc", "ipc"]
    assert set(pair.announce()[0][1]) == {"results"}
    outs = pair.call([x], make)
    assert pair.crossed == ["link", "link", "link"]
    assert all(float(o.sum()) == LINK_MIN_BYTES // 2 for o in outs)


def test_tensors_over_the_cap_always_cross_by_ipc(monkeypatch):
    monkeypatch.setattr(cuda_link, "LINK_MAX_TENSOR", 1024)
    pair = Pair()
    x = torch.ones(1024)  # 4 KiB
    for _ in range(3):
        (out,) = pair.call([x], lambda a: (a,))
        assert pair.crossed == ["ipc", "ipc"]
    assert pair.host.announcements() == ()  # never wanted a link for it


def test_tensors_shared_by_mapping_never_go_through_a_link():
    pair = Pair()
    weight = cuda_link.share_by_mapping(torch.ones(4))
    pair.call([torch.ones(1)])
    for _ in range(2):
        pair.call([weight, torch.ones(1)], lambda w, x: ())
        assert pair.crossed == ["ipc", "link"]


def test_the_interpreter_sends_results_by_ipc_until_the_link_is_mapped():
    pair = Pair()
    assert pair.interp.place(torch.ones(2)) is None


def test_a_link_the_interpreter_cannot_map_is_dropped_on_both_sides():
    pair = Pair()
    pair.call([torch.ones(2)])
    pair.announce()
    pair.call([torch.ones(LINK_MIN_BYTES)])  # outgrows the args buffer: a new one is announced
    ops = pair.interp._links[None].ops
    ops.open = lambda shared: (_ for _ in ()).throw(RuntimeError("cudaIpcOpenMemHandle failed"))
    announcements = pair.host.announcements()
    with pytest.raises(RuntimeError, match="cudaIpcOpenMemHandle"):
        pair.interp.update(announcements)
    with pytest.warns(RuntimeWarning, match="could not map"):
        pair.host.disable("interpreter 0 could not map them: RuntimeError")
    assert ("host", "drain", None) in pair.log
    for _ in range(2):
        (out,) = pair.call([torch.ones(2)], lambda a: (a + 1,))
        assert pair.crossed == ["ipc", "ipc"]
        torch.testing.assert_close(out, torch.full((2,), 2.0))
    assert not pair.host.active and pair.host.announcements() == ()


def test_links_can_be_turned_off_for_every_interpreter(monkeypatch):
    monkeypatch.setenv("MULTIPY_CUDA_LINKS", "0")
    pair = Pair()
    for _ in range(2):
        pair.call([torch.ones(2)], lambda a: (a,))
        assert pair.crossed == ["ipc", "ipc"]
    assert pair.host.disabled == "MULTIPY_CUDA_LINKS=0" and not pair.host.active


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8,
          torch.bool, torch.complex64]


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=3)))
    t = (torch.rand(shape) * 10).to(dtype)
    if len(shape) >= 2 and draw(st.booleans()):
        t = t.transpose(0, 1)  # not contiguous
    if dtype.is_floating_point and draw(st.booleans()):
        t.requires_grad_(True)
    return t


@settings(max_examples=60, deadline=None)
@given(st.lists(tensors(), max_size=6))
def test_any_tensors_cross_both_ways_with_their_values_dtype_and_shape(ts):
    pair = Pair()
    pair.call([torch.ones(1)])
    outs = pair.call(ts, lambda *a: a)
    assert len(outs) == len(ts)
    for out, t in zip(outs, ts):
        assert out.dtype == t.dtype and out.shape == t.shape
        assert not out.requires_grad  # tensors cross detached, as everywhere
        torch.testing.assert_close(out.detach(), t.detach(), rtol=0, atol=0)


def test_an_interpreter_that_cannot_map_a_link_falls_back_and_keeps_serving():
    """The host's Op.CUDA_LINK round trip, end to end on the process backend: the
    interpreter's mapping fails (here: no GPU, and not a real IPC reduction), the
    host turns links off with a warning, and the call itself still runs."""
    import multipy

    with multipy.InterpreterManager(1) as manager:
        worker = manager._workers[0]
        with manager.acquire_one() as s:
            s.global_("builtins", "len")([1]).deref()  # started
            links = worker._links
            links._make_ops = lambda index: FakeOps([], "host")
            links._wanted.add(0)
            with pytest.warns(RuntimeWarning, match="interpreter 0 could not map them"):
                assert s.global_("builtins", "sum")([1, 2]).deref() == 3
            assert links.disabled is not None and not links.active
            assert s.global_("builtins", "sum")([3, 4]).deref() == 7
