"""The wire decoders never crash or hang on garbage (hypothesis).

Random bytes and mutated valid frames must give a clean error: in the host a
:class:`~multipy.errors.TransportError` (or a ``FrameError`` from the frame
reader), in the interpreter an error *reply*.
"""

from __future__ import annotations

import os
import pickle
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multipy.backends._process_main import Loop
from multipy.errors import TransportError
from multipy.interp.state import InterpreterState
from multipy.transport.codec import Decoder, Encoder
from multipy.transport.frames import FrameError, read_frame
from multipy.transport.messages import Op, Reply, parse_reply, stamp
from multipy.transport.shm import Arena, Segment

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def valid_reply() -> bytes:
    arena = Arena(Segment.create(1 << 16))
    value = Encoder(arena).encode({"out": torch.arange(4.0), "n": 3})
    return stamp(1, pickle.dumps((value, None, (), (), False, ()), protocol=5))


VALID_REPLY = valid_reply()


def mutate(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for position, byte in flips:
        out[position % len(out)] = byte
    return bytes(out)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_as_a_reply_give_a_transport_error(data):
    with pytest.raises(TransportError, match="malformed reply frame"):
        parse_reply(data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_replies_give_a_transport_error_or_a_valid_reply(flips):
    try:
        reply = parse_reply(mutate(VALID_REPLY, flips))
    except TransportError:
        return
    assert type(reply) is Reply and type(reply.output) is bool


@pytest.fixture(scope="module")
def loop():
    """The interpreter's request loop, in-process, with real shared segments."""
    args = Segment.create(1 << 16)
    results = Segment.create(1 << 16)
    state = InterpreterState(0)
    r, w = os.pipe()
    loop = Loop(state, r, w, args.fd, os.dup(results.fd))
    yield loop, Encoder(Arena(args), returnable=results)
    os.close(r)
    os.close(w)


def served(loop, data: bytes) -> Reply:
    return parse_reply(loop.serve(data))


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_as_a_request_give_an_error_reply(loop, data):
    reply = served(loop[0], data)
    assert reply.error is not None and reply.value is None


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_requests_give_a_reply(loop, flips):
    serve, encoder = loop
    request = stamp(1, encoder.encode((int(Op.PING), (), (), ()), "arguments"))
    reply = served(serve, mutate(request, flips))
    # Still a ping (the flips missed what matters), or an error reply: never another answer.
    assert (reply.error is not None and reply.value is None) or \
        (reply.error is None and Decoder(None).decode(reply.value) == 0)


def test_a_valid_request_still_works_after_the_fuzzing(loop):
    serve, encoder = loop
    request = stamp(7, encoder.encode((int(Op.PING), (), (), ()), "arguments"))
    reply = served(serve, request)
    assert reply.call == 7 and reply.error is None and Decoder(None).decode(reply.value) == 0


@FUZZ
@given(st.binary(max_size=300))
def test_the_frame_reader_never_hangs_on_a_closed_stream(data):
    r, w = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(w, data), os.close(w)))
    writer.start()
    try:
        while True:
            frame = read_frame(r)
            if frame is None:
                break
    except FrameError:
        pass
    finally:
        writer.join()
        os.close(r)
