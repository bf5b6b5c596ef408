"""The binary forms of the common call (transport.codec, transport.messages), without interpreters.

A call of a replicated object with positional tensor and scalar arguments, and
a reply whose value is one tensor or scalar, cross in fixed binary layouts; any
other message is pickled.  Here a host-side Encoder/Decoder pair and an
interpreter-side pair share two arenas in one process, exactly as the process
backend wires them, and every value must come back equal, through the binary
form when it qualifies and through pickle when it does not.
"""

from __future__ import annotations

import collections
import gc
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multipy.errors import TransportError
from multipy.transport.codec import FAST_CALL, FAST_VALUE, Decoder, Encoder
from multipy.transport import messages
from multipy.transport.messages import (FAST_REPLY, CALL_ID, Op, RemoteException, encode_reply,
                                        parse_reply)
from multipy.transport.shm import Arena, Segment

PICKLE = 0x80
DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
          torch.float16, torch.bfloat16, torch.float32, torch.float64,
          torch.complex64, torch.complex128]
INT64 = (-(1 << 63), (1 << 63) - 1)


class Link:
    """Both ends of one interpreter link in this process: the host's encoder and
    decoder, and the interpreter's, over an args arena and a results arena."""

    def __init__(self) -> None:
        self.args = Arena(Segment.create(1 << 20))
        self.results = Arena(Segment.create(1 << 20))
        interp_args = Segment(os.dup(self.args.segment.fd), self.args.segment.size)
        interp_results = Segment(os.dup(self.results.segment.fd), self.results.segment.size)
        self.host_out = Encoder(self.args, returnable=self.results.segment, reuse_arena=True)
        self.host_in = Decoder(self.results.segment, own=self.args.segment)
        self.interp_in = Decoder(interp_args, own=interp_results)
        self.interp_out = Encoder(Arena(interp_results), returnable=interp_args)

    def request(self, op, args, drop=(), freed=()):
        """``(encoded, decoded)`` of a request sent by the host."""
        data = self.host_out.encode_request(op, args, drop, freed)
        decoded = self.interp_in.decode(data)
        self.interp_in.received = []
        return data, decoded

    def result(self, value):
        """``(encoded, decoded)`` of a result sent back by the interpreter."""
        data = self.interp_out.encode(value, "result")
        return data, self.host_in.decode(data)

    def free(self) -> None:
        for offset in self.host_out.placed:
            self.args.free(offset)
        self.host_out.placed = []


@pytest.fixture(scope="module")
def link():
    return Link()


def same(a, b) -> bool:
    """Equal values of the same type; tensors bit for bit, with dtype and shape."""
    if isinstance(a, torch.Tensor):
        return (type(b) is torch.Tensor and a.dtype == b.dtype and a.shape == b.shape
                and not b.requires_grad
                and torch.equal(a.detach().reshape(-1).view(torch.uint8) if a.numel() else a.detach(),
                                b.reshape(-1).view(torch.uint8) if b.numel() else b))
    if isinstance(a, float) and math.isnan(a):
        return type(b) is float and math.isnan(b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=4)))
    t = torch.randint(0, 100, shape).to(dtype)
    how = draw(st.sampled_from(["plain", "transposed", "sliced", "grad"]))
    if how == "transposed" and t.dim() >= 2:
        t = t.transpose(0, 1)
    elif how == "sliced" and t.dim() >= 1 and t.shape[0] > 1:
        t = t[1:]
    elif how == "grad" and dtype.is_floating_point:
        t = t.clone().requires_grad_(True)
    return t


scalars = st.one_of(st.none(), st.booleans(), st.integers(*INT64),
                    st.floats(allow_nan=True, allow_infinity=True))
fast_values = st.one_of(scalars, tensors())
# Values the binary forms do not carry: pickled, and still equal on arrival.
other_values = st.one_of(st.integers(INT64[1] + 1, 1 << 80), st.text(max_size=5),
                         st.lists(st.integers(0, 9), max_size=3),
                         st.tuples(tensors()), st.binary(max_size=5))
settings_ = settings(max_examples=150, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings_
@given(value=fast_values)
def test_a_tensor_or_scalar_result_crosses_in_the_binary_form(link, value):
    data, back = link.result(value)
    assert data[0] == FAST_VALUE
    assert same(value, back)


@settings_
@given(value=other_values)
def test_any_other_result_is_pickled(link, value):
    data, back = link.result(value)
    assert data[0] == PICKLE
    assert same(value, back)


@settings_
@given(values=st.lists(fast_values, max_size=5), method=st.one_of(st.none(), st.text(max_size=8)),
       grad=st.sampled_from([None, 0, 1, 2]), freed=st.lists(st.integers(0, 1 << 40), max_size=4),
       rid=st.integers(0, 1 << 62))
def test_a_call_with_tensors_and_scalars_crosses_in_the_binary_form(link, values, method, grad,
                                                                    freed, rid):
    args = (rid, method, tuple(values), {}, grad, None)
    data, (op, got, drop, got_freed) = link.request(int(Op.CALL_REPLICATED), args, (), tuple(freed))
    try:
        assert data[0] == FAST_CALL
        assert (op, drop, got_freed) == (Op.CALL_REPLICATED, (), tuple(freed))
        assert got[:2] == (rid, method) and got[3:] == ({}, grad, None)
        assert same(tuple(values), got[1 + 1])
    finally:
        link.free()


@settings_
@given(values=st.lists(fast_values, max_size=5), method=st.one_of(st.none(), st.text(max_size=8)),
       grad=st.sampled_from([None, 0, 1, 2]), freed=st.lists(st.integers(0, 1 << 40), max_size=4),
       rid=st.integers(0, 1 << 62))
def test_the_interpreter_reads_a_binary_call_after_its_call_id(link, values, method, grad, freed,
                                                                rid):
    args = (rid, method, tuple(values), {}, grad, None)
    data = CALL_ID.pack(7) + link.host_out.encode_request(int(Op.CALL_REPLICATED), args, (),
                                                         tuple(freed))
    try:
        got = link.interp_in.decode_call(data, CALL_ID.size)
        assert got[0:2] == (rid, method) and got[3:] == (grad, tuple(freed))
        assert same(tuple(values), got[2])
    finally:
        link.interp_in.received = []
        link.free()


def test_only_a_binary_call_is_read_as_one(link):
    pickled = link.host_out.encode_request(int(Op.CALL), (None, (1,), {}, 0, False), (), ())
    with pytest.raises(TransportError, match="not a binary call"):
        link.interp_in.decode_call(pickled)
    with pytest.raises(TransportError, match="corrupt"):
        link.interp_in.decode_call(bytes([FAST_CALL, 0, 1]))


def test_a_tensor_item_whose_shape_does_not_fit_its_bytes_is_a_transport_error(link):
    data = bytearray(link.interp_out.encode(torch.ones(1, 16), "result"))
    assert data[0] == FAST_VALUE
    data[14:22] = (4).to_bytes(8, "little")  # nbytes: 4, not the 64 that 1x16 float32 needs
    with pytest.raises(TransportError, match="shape"):
        link.host_in.decode(bytes(data))


def test_a_result_block_is_released_once_its_last_tensor_dies(link):
    # The host learns that a result block is free from a C-level append of the
    # block's reference when its last tensor (a view included) dies.
    released = collections.deque()
    decoder = Decoder(link.results.segment, own=link.args.segment, released=released)
    data = link.interp_out.encode(torch.arange(8.0), "result")
    offset = link.interp_out.placed[0]
    t = decoder.decode(data)
    view = t[2:]
    del t
    gc.collect()
    assert decoder.released_offsets() == ()
    assert view.tolist() == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    del view
    gc.collect()
    assert decoder.released_offsets() == (offset,)
    assert decoder.released_offsets() == ()
    link.results.free(offset)


@settings_
@given(values=st.lists(fast_values, max_size=3), other=other_values,
       where=st.sampled_from(["argument", "kwargs", "recipe", "drop"]))
def test_any_other_call_is_pickled_and_arrives_whole(link, values, other, where):
    positional, kwargs, recipe, drop = tuple(values), {}, None, ()
    if where == "argument":
        positional += (other,)
    elif where == "kwargs":
        kwargs = {"x": other}
    elif where == "recipe":
        recipe = (0, 1, "/p.pt", "model", "model.pkl", None, None)
    else:
        drop = ((0, 5),)
    args = (3, None, positional, kwargs, 0, recipe)
    data, (op, got, got_drop, _) = link.request(int(Op.CALL_REPLICATED), args, drop)
    try:
        assert data[0] == PICKLE
        assert op == Op.CALL_REPLICATED and got_drop == drop
        assert same(positional, got[2]) and got[5] == recipe
        assert got[3].keys() == kwargs.keys() and all(same(kwargs[k], got[3][k]) for k in kwargs)
    finally:
        link.free()


def test_other_operations_are_pickled(link):
    data, decoded = link.request(int(Op.CALL), (None, (torch.ones(2),), {}, 0, False))
    link.free()
    assert data[0] == PICKLE and same(decoded[1][1], (torch.ones(2),))


def test_an_abandoned_binary_encoding_gives_its_blocks_back(link):
    # The first argument is placed in the arena before the second turns out to
    # need pickle: the binary attempt's block must not stay allocated.
    before = dict(link.args._used)
    data, _ = link.request(int(Op.CALL_REPLICATED), (1, None, (torch.ones(3), "text"), {}, 0, None))
    assert data[0] == PICKLE
    assert len(link.host_out.placed) == 1  # the pickle's own copy only
    link.free()
    assert link.args._used == before


@pytest.mark.parametrize("view", [lambda a: a, lambda a: a[1:], lambda a: a.t(), lambda a: a[:, 1]],
                         ids=["itself", "rows", "transposed", "column"])
def test_a_result_viewing_its_argument_crosses_back_by_reference(link, view):
    # The interpreter hands the argument's block back, no copy, and the host views
    # its own arena in place: as a plain block (the whole argument) or strided.
    x = torch.arange(12.0).reshape(3, 4)
    _, (_, args, _, _) = link.request(int(Op.CALL_REPLICATED), (1, None, (x,), {}, 0, None))
    block = link.host_out.placed[0]
    data, back = link.result(view(args[2][0]))
    assert data[0] == FAST_VALUE and same(view(x).contiguous(), back.contiguous())
    assert back.untyped_storage().data_ptr() == link.args.segment.address + block
    assert back.stride() == view(x).stride()
    del back, args
    link.free()


_C_REPLY = (messages._c_pack_reply, messages._c_unpack_reply)


@pytest.fixture(params=[("python", "python"), ("c", "c"), ("python", "c"), ("c", "python")],
                ids=lambda p: f"packed-{p[0]}-read-{p[1]}")
def reply_forms(request, monkeypatch):
    """The reply header packed and read by the extension's functions or by their
    pure-Python twins, in every pairing: both write and accept the same bytes."""
    packer, reader = request.param
    if "c" in request.param and _C_REPLY[0] is None:
        pytest.skip("the C extension is not loaded here (MULTIPY_NATIVE=0, or not built): "
                    "only the pure-Python reply header runs")
    monkeypatch.setattr(messages, "_c_pack_reply", _C_REPLY[0] if packer == "c" else None)
    monkeypatch.setattr(messages, "_c_unpack_reply", _C_REPLY[1] if reader == "c" else None)
    return request.param


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(call=st.integers(0, (1 << 64) - 1), value=st.one_of(st.none(), st.binary(min_size=1, max_size=40)),
       pinned=st.lists(st.integers(0, 1 << 40), max_size=20),
       unpinned=st.lists(st.integers(0, 1 << 40), max_size=3),
       blocks=st.lists(st.integers(0, 1 << 40), max_size=3), output=st.booleans(),
       error=st.booleans())
def test_replies_round_trip(reply_forms, call, value, pinned, unpinned, blocks, output, error):
    exc = RemoteException("ValueError", "bad", "Traceback ...", None) if error else None
    frame = encode_reply(call, value, exc, tuple(pinned), tuple(unpinned), output, tuple(blocks))
    assert (frame[CALL_ID.size] == FAST_REPLY) == (not error and len(pinned) <= 16)
    reply = parse_reply(frame)
    assert tuple(reply) == (call, value, exc, tuple(pinned), tuple(unpinned), output, tuple(blocks))


@pytest.mark.parametrize("frame", [
    CALL_ID.pack(1) + bytes([FAST_REPLY]),                               # header cut short
    encode_reply(1, None, None, (64,), (), False, ())[:-3],              # block list cut short
    encode_reply(1, None, None, (), (), False, ()) + b"junk",            # bytes after a reply without value
    encode_reply(1, b"v", None, (), (), False, ())[:-1],                 # a value announced, none there
    CALL_ID.pack(1) + bytes([FAST_REPLY, 0x80, 0, 0, 0, 0, 0, 0]),       # unknown flags
])
def test_a_corrupt_binary_reply_is_a_transport_error(reply_forms, frame):
    with pytest.raises(TransportError):
        parse_reply(frame)


@pytest.mark.parametrize("data", [
    bytes([FAST_VALUE, 9]),                     # unknown item
    bytes([FAST_VALUE, 3, 1, 2]),               # an int cut short
    bytes([FAST_VALUE, 0, 0]),                  # stray bytes
    bytes([FAST_CALL, 0, 1]),                   # a call header cut short
    bytes([FAST_VALUE, 5, 7, 0, 0, 0]) + bytes(24),  # a tensor in an unknown segment
    bytes([FAST_VALUE, 5, 0, 99, 0, 0]) + bytes(24),  # a tensor of an unknown dtype
    bytes([FAST_VALUE, 5, 2, 0, 1, 0]) + bytes(24) + (1 << 40).to_bytes(8, "little"),  # "empty", 2**40 elements
    bytes([FAST_VALUE, 5, 0, 11, 0, 0]) + (49).to_bytes(8, "little") + (16).to_bytes(8, "little")
    + bytes(8),                                 # a complex128 block off its elements (torch would fault)
    bytes([FAST_VALUE, 5, 0, 3, 1, 0]) + (3).to_bytes(8, "little") + (2).to_bytes(8, "little")
    + bytes(8) + (1).to_bytes(8, "little"),     # a bfloat16 block off its elements (the rebuild path)
])
def test_a_corrupt_binary_value_raises(link, data):
    with pytest.raises(TransportError):
        link.host_in.decode(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=st.sampled_from([FAST_VALUE, FAST_CALL]), body=st.binary(max_size=120))
def test_random_binary_messages_raise_cleanly(link, prefix, body):
    # Whatever the bytes say, decoding returns or raises an ordinary exception
    # (the interpreter answers it as an error reply, the host as a TransportError).
    try:
        link.interp_in.decode(bytes([prefix]) + body)
    except Exception:
        pass
    finally:
        link.interp_in.received = []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(call=st.integers(0, (1 << 64) - 1), body=st.binary(max_size=80))
def test_random_binary_replies_are_read_or_refused_cleanly(reply_forms, call, body):
    # Whatever follows the reply tag, reading it returns a Reply or raises a
    # TransportError (the host then restarts the interpreter): never anything else.
    frame = CALL_ID.pack(call) + bytes([FAST_REPLY]) + body
    try:
        reply = parse_reply(frame)
    except TransportError:
        return
    assert reply.call == call and reply.error is None
    assert encode_reply(*reply[:1], reply.value, None, reply.pinned, reply.unpinned, reply.output,
                        reply.blocks) == frame
