"""Tensor items encoded and read in C (multipy._native.tensor_item / tensor_read)
against the codec's Python path, on the same inputs.

The extension makes and reads the binary form's tensor items through DLPack:
torch's C exchange API where torch has one, its "dltensor" capsules otherwise;
both are checked.  Whatever the C functions do not handle they answer with None
and the Python path takes the tensor, so for every input the bytes written and
the tensor read must be the ones the Python path gives, and a block must be
released exactly when its last tensor dies, whichever path made the tensor.
"""

from __future__ import annotations

import collections
import gc
import os
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _tensors import same, scalars, tensor_bytes, tensors
from multipy.errors import TransportError
from multipy.transport import codec
from multipy.transport.codec import FAST_VALUE, Decoder, Encoder
from multipy.transport.shm import Arena, Segment

native = pytest.importorskip("multipy.transport.channel")._native_module
if native is None or not hasattr(native, "tensor_item"):
    pytest.skip("the C extension is not loaded here (MULTIPY_NATIVE=0, or not built): "
                "only the Python path runs", allow_module_level=True)

HAS_EXCHANGE_API = getattr(torch.Tensor, "__dlpack_c_exchange_api__", None) is not None
_ITEM = slice(1, None)  # a FAST_VALUE message's item


@pytest.fixture(scope="module", params=["exchange API", "capsules"])
def path(request):
    """The extension's tensor functions over torch's exchange API, then over capsules."""
    if request.param == "exchange API" and not HAS_EXCHANGE_API:
        pytest.skip("this torch has no DLPack exchange API")
    assert codec.native_tensors(exchange_api=request.param == "exchange API") == request.param
    yield request.param
    codec.native_tensors()


@pytest.fixture(scope="module")
def ends(path):
    """A host encoder and the interpreter's decoder over one args arena, as the
    process backend wires them, and the results arena the decoder hands back into."""
    args = Arena(Segment.create(1 << 16))
    results = Segment.create(1 << 16)
    interp_args = Segment(os.dup(args.segment.fd), args.segment.size)
    interp_results = Segment(os.dup(results.fd), results.size)
    encoder = Encoder(args, returnable=results, reuse_arena=True)
    decoder = Decoder(interp_args, own=interp_results)
    return encoder, decoder, args


def python_path():
    """Turn the extension's tensor functions off until the context ends."""
    saved = codec._tensor_item, codec._tensor_read, codec._c_read_call, codec._c_pack_call

    class _Off:
        def __enter__(self):
            codec._tensor_item = codec._tensor_read = codec._c_read_call = codec._c_pack_call = None

        def __exit__(self, *exc):
            codec._tensor_item, codec._tensor_read, codec._c_read_call, codec._c_pack_call = saved

    return _Off()


settings_ = settings(max_examples=200, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings_
@given(t=tensors())
def test_c_writes_the_item_the_python_path_writes(ends, t):
    encoder, decoder, args = ends
    with python_path():
        expected = encoder.encode(t)
    placed_py = encoder.placed
    for offset in placed_py:
        args.free(offset)
    data = encoder.encode(t)  # the same block again: the size class hands it back
    try:
        assert encoder.placed == placed_py
        assert data == expected
        got = decoder.decode(data)
        assert same(t, got)
    finally:
        decoder.received = []
        for offset in encoder.placed:
            args.free(offset)


@settings_
@given(t=tensors())
def test_c_reads_the_tensor_the_python_path_reads(ends, t):
    encoder, decoder, args = ends
    with python_path():
        data = encoder.encode(t)
    try:
        with python_path():
            expected = decoder.decode(data)
        by_python, decoder.received = decoder.received, []
        got = decoder.decode(data)
        by_c, decoder.received = decoder.received, []
        assert same(expected, got) and same(t, got)
        assert [o for o, _ in by_c] == [o for o, _ in by_python]
        if by_c:  # both views are of the same bytes of the arena
            assert got.data_ptr() == expected.data_ptr()
    finally:
        for offset in encoder.placed:
            args.free(offset)


@pytest.mark.parametrize("t", [torch.ones(1, 16), torch.arange(6, dtype=torch.int16).reshape(2, 3),
                               torch.tensor(2.5), torch.ones(3, dtype=torch.bfloat16),
                               torch.tensor([True, False])],
                         ids=["1x16", "int16", "0-d", "bfloat16", "bool"])
def test_the_fast_path_takes_the_common_tensors(ends, t):
    # The extension answers these itself (the Python path is not asked).
    encoder, _, args = ends
    placed = []
    item = native.tensor_item(t, None, args, False, placed)
    assert item is not None and item[0] == 5 and len(placed) == 1
    read = native.tensor_read(bytes([FAST_VALUE]) + item, 1, args.segment, None)
    assert read is not None
    tensor, holder, seg, offset, end = read
    assert same(t, tensor) and (seg, offset, end) == (0, placed[0], 1 + len(item))
    assert type(holder).__name__ == "TensorBlock"
    del tensor, read
    args.free(placed[0])


@pytest.mark.parametrize("make", [
    lambda: torch.arange(6.0).reshape(2, 3).t(),
    lambda: torch.ones(2, dtype=torch.complex64).conj(),
    lambda: torch.tensor([1 + 2j]).conj().imag,
    lambda: torch.ones(2).to_sparse(),
    lambda: torch._empty_affine_quantized([2], scale=0.1, zero_point=0, dtype=torch.quint8),
    lambda: torch.ones(2, dtype=torch.uint16),
], ids=["transposed", "conj", "neg", "sparse", "quantized", "uint16"])
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_what_the_fast_path_leaves_to_python(ends, make):
    encoder, _, args = ends
    placed = []
    assert native.tensor_item(make(), None, args, False, placed) is None
    assert placed == []  # nothing taken from the arena


def test_a_block_is_released_when_its_last_tensor_dies(path):
    # The tensor's storage holds the block's holder; a view keeps it too; the
    # holder's death appends its reference (C-level) for released_offsets.
    results = Arena(Segment.create(1 << 16))
    encoder = Encoder(results)
    released = collections.deque()
    decoder = Decoder(Segment(os.dup(results.segment.fd), results.segment.size), released=released)
    data = encoder.encode(torch.arange(8.0))
    offset = encoder.placed[0]
    t = decoder.decode(data)
    view = t[2:]
    del t
    gc.collect()
    assert decoder.released_offsets() == ()
    assert view.tolist() == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    done = threading.Event()

    def drop(box):  # the last tensor dies on another thread
        box.clear()
        done.set()

    box = [view]
    del view
    threading.Thread(target=drop, args=(box,)).start()
    assert done.wait(10)
    assert decoder.released_offsets() == (offset,)


def test_a_tensor_keeps_its_mapping_when_the_segment_grows(path):
    # The reader's segment is remapped when the writer's arena grows; a tensor over
    # the old mapping must still read its bytes (the holder keeps that mapping).
    arena = Arena(Segment.create(4096))
    encoder = Encoder(arena)
    reader = Segment(os.dup(arena.segment.fd), arena.segment.size)
    decoder = Decoder(reader)
    t = decoder.decode(encoder.encode(torch.arange(16.0)))
    decoder.received = []
    big = encoder.encode(torch.zeros(1 << 14))  # past the segment's size: it grows
    assert arena.segment.size > 4096
    reader.remap()
    gc.collect()
    assert t.tolist() == [float(i) for i in range(16)]
    assert decoder.decode(big).shape == (1 << 14,)


def test_a_tensor_handed_back_in_place_is_described_where_it_lies(ends):
    # A tensor in the returnable segment (the receiver's own) or, with reuse_arena,
    # in the encoder's arena crosses without a copy; one that does not start where
    # its storage does is left to the Python path (a strided descriptor).
    encoder, decoder, args = ends
    data = encoder.encode(torch.arange(12.0).reshape(3, 4))
    block = encoder.placed[0]
    received = decoder.decode(data)  # viewed in the interpreter, over the host's arena
    decoder.received = []
    item = native.tensor_item(received, decoder.outbound, None, False, [])
    with python_path():
        assert item == Encoder(None, returnable=decoder.outbound).encode(received)[_ITEM]
    assert item[1] == 1 and int.from_bytes(item[5:13], "little") == block
    assert native.tensor_item(received[1:], decoder.outbound, None, False, []) is None
    # The host's own arena block (reuse_arena): described in place, no new block.
    placed = []
    item = native.tensor_item(decoder.decode(data), None, type("A", (), {"segment": decoder.outbound})(),
                              True, placed)
    decoder.received = []
    assert item is not None and item[1] == 0 and placed == []
    assert int.from_bytes(item[5:13], "little") == block
    args.free(block)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(t=tensors(), at=st.integers(0, 60), byte=st.integers(0, 255), cut=st.integers(0, 8))
def test_a_corrupt_item_reads_as_the_python_path_reads_it(ends, t, at, byte, cut):
    # One byte changed, or the item cut short: the extension either makes the tensor
    # the Python path makes or leaves the item to it; never a crash.
    encoder, decoder, args = ends
    with python_path():
        data = bytearray(encoder.encode(t))
    try:
        if at < len(data):
            data[at] = byte
        data = bytes(data[:len(data) - cut])
        try:
            with python_path():
                expected = decoder.decode(data)
        except Exception as exc:
            expected = exc
        decoder.received = []
        try:
            got = decoder.decode(data)
        except Exception as exc:
            got = exc
        decoder.received = []
        if isinstance(expected, BaseException):
            assert type(got) is type(expected)
        elif isinstance(expected, torch.Tensor):
            assert isinstance(got, torch.Tensor) and got.dtype == expected.dtype
            assert got.shape == expected.shape
            if got.numel():
                assert torch.equal(tensor_bytes(got), tensor_bytes(expected))
        else:
            assert got == expected or (got != got and expected != expected)
    finally:
        for offset in encoder.placed:
            args.free(offset)


def test_a_block_past_the_mapping_is_left_to_the_python_path(ends):
    encoder, decoder, args = ends
    with python_path():
        data = bytearray(encoder.encode(torch.ones(4)))
    args.free(encoder.placed[0])
    data[6:14] = (1 << 40).to_bytes(8, "little")  # offset far past the segment
    assert native.tensor_read(bytes(data), 1, decoder.outbound, None) is None
    with pytest.raises((TransportError, ValueError)):
        decoder.decode(bytes(data))


def test_the_block_comes_from_its_size_class_as_arena_alloc_takes_it(ends):
    # The extension takes a freed block of the tensor's size class itself, and
    # enters it in the arena's books exactly as Arena.alloc does.
    _, _, args = ends
    t = torch.ones(100)  # 400 bytes: the 512-byte class
    placed = []
    native.tensor_item(t, None, args, False, placed)
    first = placed[0]
    assert args._used[first] == 512
    args.free(first)
    assert first in args._classes[512]
    native.tensor_item(t, None, args, False, placed)
    assert placed[1] == first and args._used[first] == 512 and first not in args._classes[512]
    args.free(first)
    assert args.alloc(400) == first  # and Arena.alloc finds it given back
    args.free(first)


call_args = st.lists(st.one_of(scalars, tensors()), max_size=4)


def _same_call(a, b) -> bool:
    return (a[0] == b[0] and a[1] == b[1] and a[3] == b[3] and a[4] == b[4]
            and len(a[2]) == len(b[2])
            and all(same(x, y) if isinstance(x, torch.Tensor) else (type(x) is type(y) and x == y)
                    for x, y in zip(a[2], b[2])))


@settings_
@given(values=call_args, method=st.one_of(st.none(), st.text(max_size=8)),
       grad=st.sampled_from([None, 0, 1]), freed=st.lists(st.integers(0, 1 << 40), max_size=3))
def test_c_reads_the_call_the_python_path_reads(ends, values, method, grad, freed):
    encoder, decoder, args = ends
    with python_path():
        data = encoder.encode_request(14, (7, method, tuple(values), {}, grad, None), (), tuple(freed))
    try:
        with python_path():
            expected = decoder.decode_call(data)
        by_python, decoder.received = decoder.received, []
        got = decoder.decode_call(data)
        by_c, decoder.received = decoder.received, []
        assert _same_call(expected, got) and got[1] == method and got[3] == grad
        assert [o for o, _ in by_c] == [o for o, _ in by_python]
    finally:
        for offset in encoder.placed:
            args.free(offset)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=call_args, at=st.integers(0, 120), byte=st.integers(0, 255), cut=st.integers(0, 8))
def test_a_corrupt_call_reads_as_the_python_path_reads_it(ends, values, at, byte, cut):
    encoder, decoder, args = ends
    with python_path():
        data = bytearray(encoder.encode_request(14, (7, "f", tuple(values), {}, 1, None), (), (64,)))
    try:
        if at < len(data):
            data[at] = byte
        data = bytes(data[:len(data) - cut])
        outcomes = []
        for python in (True, False):
            try:
                if python:
                    with python_path():
                        outcomes.append(decoder.decode_call(data))
                else:
                    outcomes.append(decoder.decode_call(data))
            except Exception as exc:
                outcomes.append(exc)
            decoder.received = []
        expected, got = outcomes
        if isinstance(expected, BaseException):
            assert type(got) is type(expected)
        else:
            assert expected[:2] == got[:2] and expected[3:] == got[3:]
            for x, y in zip(expected[2], got[2], strict=True):
                if isinstance(x, torch.Tensor):
                    assert x.dtype == y.dtype and x.shape == y.shape
                    if x.numel():
                        assert torch.equal(tensor_bytes(x), tensor_bytes(y))
                else:
                    assert type(x) is type(y) and (x == y or x != x)
    finally:
        for offset in encoder.placed:
            args.free(offset)


def test_the_common_call_is_read_by_the_extension(ends):
    encoder, decoder, args = ends
    x = torch.ones(1, 16)
    data = encoder.encode_request(14, (7, "forward", (x, 2, 2.5, None, True), {}, 1, None), (), (64, 128))
    read = native.read_call(data, 0, decoder.outbound, decoder.own)
    assert read is not None
    rid, method, positional, grad, freed, blocks = read
    assert (rid, method, grad, freed) == (7, "forward", 1, (64, 128))
    assert same(x, positional[0]) and positional[1:] == (2, 2.5, None, True)
    assert [(seg, offset) for seg, offset, _ in blocks] == [(0, encoder.placed[0])]
    del read, positional, blocks
    args.free(encoder.placed[0])


@settings_
@given(values=st.lists(st.one_of(scalars, tensors(), st.integers(1 << 63, 1 << 70), st.text(max_size=3)),
                       max_size=4),
       method=st.one_of(st.none(), st.text(max_size=8)), grad=st.sampled_from([None, 0, 1]),
       freed=st.lists(st.integers(0, 1 << 40), max_size=3))
def test_c_writes_the_call_the_python_path_writes(ends, values, method, grad, freed):
    # The same form (binary or pickled when an argument needs it), the same length,
    # and the same call read back; a binary attempt abandoned half way gives back
    # what it placed.
    encoder, decoder, args = ends
    request = (7, method, tuple(values), {}, grad, None)
    before = dict(args._used)
    with python_path():
        expected = encoder.encode_request(14, request, (), tuple(freed))
        placed_py, encoder.placed = encoder.placed, []
        read_py = decoder.decode(expected)
    decoder.received = []
    data = encoder.encode_request(14, request, (), tuple(freed))
    try:
        assert len(encoder.placed) == len(placed_py)
        assert data[0] == expected[0]
        if data[0] == 0x02:  # binary: equal but for the blocks' offsets
            assert data[:18] == expected[:18] and len(data) == len(expected)
        read = decoder.decode(data)
        decoder.received = []
        assert read[0] == read_py[0] and read[1][:2] == read_py[1][:2] and read[1][3:] == read_py[1][3:]
        assert read[3] == read_py[3] == tuple(freed)
        for x, y in zip(read_py[1][2], read[1][2], strict=True):
            if isinstance(x, torch.Tensor):
                assert same(x, y)
            else:
                assert type(x) is type(y) and (x == y or x != x)
    finally:
        for offset in encoder.placed + placed_py:
            args.free(offset)
        encoder.placed = []
    assert args._used == before


def test_a_torch_that_exports_a_dtype_otherwise_keeps_the_python_path(monkeypatch):
    # The extension's dtype codes assume DLPack's types for torch's dtypes (bool as
    # kDLBool, ...): a torch that exports one otherwise gets the Python path.
    from multipy.transport import channel

    class Elsewise:
        def __getattr__(self, name):
            return getattr(native, name)

        @staticmethod
        def tensor_item(t, *args):
            item = native.tensor_item(t, *args)
            return item[:2] + bytes([8]) + item[3:] if t.dtype == torch.bool else item  # as uint8

    was = codec._native_tensors
    monkeypatch.setattr(channel, "_native_module", Elsewise())
    try:
        assert codec.native_tensors() == "Python" and codec._tensor_item is None
    finally:
        monkeypatch.undo()
        codec.native_tensors(exchange_api=was != "capsules")
    assert was is None or codec._native_tensors == was
