"""What each step of one call costs, host side and interpreter side, measured alone.

The steps of a 1x16 identity call (the call ``multipy bench --overhead`` times)
run here one at a time in one process, each in a tight loop: the host's encoder
and decoder and the interpreter's, wired over two arenas exactly as the process
backend wires them, the call channel's C calls on a channel attached twice, and
the Python layers above the worker with the worker's transport stubbed out.
A step measured hot in a loop is its floor: inside a real call each runs with
colder caches (see docs/native-channel.md for how the two compare).

    PYTHONPATH=src python benchmarks/call_steps.py [N]          # µs per step (best of 5 loops of N)
    PYTHONPATH=src python benchmarks/call_steps.py [N] --floors # ns per torch/numpy operation
    ... call_steps.py [N] --step TEXT    # only the steps whose side or label has TEXT

``--tensors=exchange|capsules|python`` picks how tensor items are encoded and
read (the extension over torch's DLPack exchange API, the extension over DLPack
capsules, or the codec's Python path; default: what the codec uses here).

Under callgrind it counts instructions per step instead (two windows of N and
2N runs per step, each dumped; their difference over N, as in
count_instructions.py), which does not depend on the machine's load::

    CALL_STEPS_OUT=/tmp/steps valgrind --tool=callgrind --instr-atstart=no \\
        --callgrind-out-file=/tmp/steps/cg.%p python benchmarks/call_steps.py 200 --callgrind
"""
from __future__ import annotations

import collections
import gc
import os
import subprocess
import sys
import timeit

import torch

from multipy.backends._process_main import Loop
from multipy.backends.base import Worker, WorkerConfig
from multipy.interp.state import InterpreterState
from multipy.runtime import InterpreterManager
from multipy.transport import channel as _channel
from multipy.transport import codec
from multipy.transport.codec import Decoder, Encoder
from multipy.transport.messages import CALL_ID, encode_reply, parse_reply, unpack_fast_reply
from multipy.transport.shm import Arena, Segment, held_blocks

_CALL_REPLICATED = 14


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x


class _StubWorker(Worker):
    """A worker whose transport answers at once: Worker's own bookkeeping only."""

    request = Worker._request_in_flight

    def __init__(self) -> None:
        super().__init__(WorkerConfig(index=0, sys_path=(), num_threads=1))
        self._started = True

    def _send_call(self, op, args, drop, timeout, handles):
        return args

    def _await_call(self, ticket):
        return ticket, None


def _steps():
    """``(side, label, setup -> step)`` for every step of one call."""
    x = torch.randn(1, 16)
    args_arena = Arena(Segment.create(1 << 20))
    results = Arena(Segment.create(1 << 20))
    interp_args = Segment(os.dup(args_arena.segment.fd), args_arena.segment.size)
    interp_results = Segment(os.dup(results.segment.fd), results.segment.size)
    lock = __import__("threading").RLock()
    held = held_blocks(args_arena, set(), lock)  # as the process backend keeps them
    released = collections.deque()
    host_out = Encoder(args_arena, returnable=results.segment, reuse_arena=True)
    host_in = Decoder(results.segment, own=args_arena.segment, released=released, held=held)
    interp_in = Decoder(interp_args, own=interp_results)
    interp_out = Encoder(Arena(interp_results), returnable=interp_args)
    state = InterpreterState(0)
    state.replicated[1] = _Identity()
    request_args = (1, None, (x,), {}, 0, None)

    # one request and its reply, as they cross
    request = host_out.encode_request(_CALL_REPLICATED, request_args, (), ())
    block = host_out.placed[0]
    framed = CALL_ID.pack(1) + request
    rid, method, call_args, grad, _ = interp_in.decode_call(framed, CALL_ID.size)
    argument = call_args[0]  # the interpreter's view of the argument's block
    value = interp_out.encode(state.call_plain(rid, method, call_args, grad), "result")
    reply = encode_reply(1, value, None, (), (), False, ())
    interp_in.received = []
    interp_results = interp_out.arena

    def encode_request():
        host_out.encode_request(_CALL_REPLICATED, request_args, (), ())
        args_arena.free(host_out.placed[0])

    def decode_call():
        interp_in.decode_call(framed, CALL_ID.size)
        interp_in.received = []

    def call_model():
        state.call_plain(1, None, (x,), 0)

    def encode_result():
        interp_out.encode(argument, "result")

    def encode_new_result():
        interp_out.encode(x, "result")
        interp_results.free(interp_out.placed[0])

    def answer():
        encode_reply(1, value, None, (), (), False, ())

    def parse():
        parse_reply(reply)

    def unpack():
        unpack_fast_reply(reply)

    def decode_and_drop():
        args_arena._used[block] = 64  # the argument's block, held by the call
        t = host_in.decode(value)
        held.release((block,))  # the call's end (ProcessWorker._settle): still viewed
        del t  # the caller drops the result: its block is free again
        if held.pending:
            held.settle()  # (blocks over 64 KiB: the next call's _send)

    steps = [
        ("host", "encode the request: the 1x16 tensor's item, arena block, copy, header "
                 "(Encoder.encode_request) + give the block back", encode_request),
        ("interpreter", "read the request (Decoder.decode_call: header, the tensor "
                        "over its block)", decode_call),
        ("interpreter", "call the model (InterpreterState.call_plain: grad mode, "
                        "nn.Module.__call__ of an identity)", call_model),
        ("interpreter", "encode the result: the argument itself, handed back in place "
                        "(Encoder.encode)", encode_result),
        ("interpreter", "encode a new 1x16 result instead: arena block, copy "
                        "(Encoder.encode) + give the block back", encode_new_result),
        ("interpreter", "pack the reply (messages.encode_reply)", answer),
        ("host", "parse the reply (messages.parse_reply)", parse),
        ("host", "rebuild the result tensor (over its block, its holder counted), end "
                 "the call (held.release) and drop the result (deallocation, arena free)",
         decode_and_drop),
    ]

    if unpack_fast_reply is not None:  # the extension is loaded
        steps.insert(7, ("host", "read the reply's fields into a plain tuple, as the process "
                                 "backend does (messages.unpack_fast_reply, in C)", unpack))

    # The interpreter's serving loop around those steps: Loop.serve of the framed
    # request (its own bookkeeping: kept blocks, watched arguments, output flags)
    # reading, calling, encoding and packing, all in one, as it serves the channel.
    loop = Loop(state, -1, -1, os.dup(args_arena.segment.fd), os.dup(results.segment.fd))
    loop_framed = CALL_ID.pack(1) + host_out.encode_request(_CALL_REPLICATED, request_args, (), ())

    def serve():
        loop.serve(loop_framed)
        for block in loop.encoder.placed:  # none: the result is the argument, in place
            loop.results.free(block)

    steps.append(("interpreter", "Loop.serve of the request: read, call, encode, pack "
                                 "(the four steps above) and the loop's own bookkeeping", serve))

    if _channel.NATIVE:
        fd, host_end, memory = _channel.create("multipy-steps")
        interp_end, interp_memory = _channel.attach(fd)
        payload = framed

        def channel_round():
            slot = host_end.claim()
            host_end.post(payload, slot)
            tag, data = interp_end.take()
            interp_end.reply(tag & 0xFFFF, reply, 0)
            host_end.take_reply(slot)
            host_end.release(slot)

        steps.append(("both", "call channel, no waiting: claim, post, take, reply, take_reply, "
                              "release (C)", channel_round))

        # The interpreter's serving loop in C (Loop._common_calls: _native.serve_calls)
        # serving the same request from the channel, reply written into its slot; a
        # second, uncommon request (a pickle's first byte) ends it, handed back.
        common = loop._common_calls(interp_end)
        if common is not None:
            stop = CALL_ID.pack(2) + b"\x80"

            def serve_calls():
                slot = host_end.claim()
                host_end.post(loop_framed, slot)
                last = host_end.claim()
                host_end.post(stop, last)
                common()
                host_end.take_reply(slot)
                host_end.release(slot)
                host_end.release(last)

            steps.append(("interpreter", "the serving loop in C (_native.serve_calls) of the "
                                         "request: take, go word, read, call, result item, reply "
                                         "in the slot; with the host's claim, post, take_reply, "
                                         "release, and a second request handed back to end it",
                          serve_calls))

    worker = _StubWorker()
    steps.append(("host", "Worker.request bookkeeping (lock, counters, latency; transport "
                          "stubbed)", lambda: worker.request(_CALL_REPLICATED, request_args)))

    manager = InterpreterManager(1, backend="thread", num_threads=1)
    model = manager.load_package(_identity_archive()).load_pickle("model", "model.pkl")
    manager._workers[0].request = lambda *a, **k: None  # everything below the worker stubbed
    steps.append(("host", "ReplicatedObj.__call__ -> manager -> balancer (worker stubbed)",
                  lambda: model(x)))
    return steps, manager


def _identity_archive():
    from multipy.bench.targets import example_archive

    return example_archive("identity")


_FLOORS = (
    ("numpy slice of the arena, .view(dtype), .reshape(shape)",
     "base[64:128].view(f4).reshape((1, 16))"),
    ("numpy.ndarray(shape, dtype, mapping, offset)", "np.ndarray((1, 16), f4, mm, 64)"),
    ("torch.from_numpy(array)", "torch.from_numpy(array)"),
    ("torch.frombuffer(mapping, dtype=, count=, offset=)",
     "torch.frombuffer(mm, dtype=torch.float32, count=16, offset=64)"),
    ("cached float32 tensor over the arena: .as_strided(shape, stride, offset)",
     "f32.as_strided((1, 16), (16, 1), 16)"),
    ("cached float32 tensor over the arena sliced and viewed", "f32[16:32].view(1, 16)"),
    ("torch.empty(0).set_(storage, offset, shape, stride)",
     "torch.empty(0).set_(storage, 0, (1, 16), (16, 1))"),
    ("t.is_cpu", "t.is_cpu"), ("t.dtype", "t.dtype"), ("t.nbytes", "t.nbytes"),
    ("t.data_ptr()", "t.data_ptr()"), ("tuple(t.shape)", "tuple(t.shape)"),
    ("an identity nn.Module called", "module(t)"),
    ("its forward called directly", "module.forward(t)"),
)


def floors(n: int) -> None:
    """ns per torch or numpy operation a call needs, best of 5 loops of n."""
    import mmap

    import numpy as np

    mm = mmap.mmap(-1, 1 << 20)
    base = np.frombuffer(mm, dtype=np.uint8)
    array = base[64:128].view(np.float32).reshape((1, 16))
    f32 = torch.from_numpy(base).view(torch.float32)
    t = torch.randn(1, 16)
    names = dict(np=np, torch=torch, mm=mm, base=base, array=array, f32=f32, t=t,
                 f4=np.dtype(np.float32), storage=t.untyped_storage(), module=_Identity())
    for label, stmt in _FLOORS:
        best = min(timeit.repeat(stmt, globals=names, number=n, repeat=5)) / n
        print(f"{best * 1e9:8.0f} ns  {label}", flush=True)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 20000
    if "--floors" in sys.argv:
        floors(n * 10)
        return
    counting = "--callgrind" in sys.argv
    tensors = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--tensors=")), None)
    if tensors is not None:  # which path encodes and reads tensor items
        _tensor_path(tensors)
    print(f"tensor items: {codec.native_tensors() if tensors is None else tensors}", flush=True)
    only = sys.argv[sys.argv.index("--step") + 1] if "--step" in sys.argv else ""
    steps, manager = _steps()
    steps = [step for step in steps if only in f"{step[0]} {step[1]}"]
    try:
        gc.collect()
        gc.disable()  # a collection in one step's loop would be charged to it
        for side, label, fn in steps:
            fn()
            if counting:
                line = f"{_count(fn, n):>9,.0f} instructions"
            else:
                best = min(timeit.repeat(fn, number=n, repeat=5)) / n
                line = f"{best * 1e6:6.2f} µs"
            print(f"{side:>11}  {line}  {label}", flush=True)
    finally:
        gc.enable()
        manager.close()


def _tensor_path(name: str) -> None:
    """Encode and read tensor items through ``name``: "exchange" (the extension, over
    torch's DLPack exchange API), "capsules" (the extension, over DLPack capsules)
    or "python" (the codec's Python path)."""
    if name == "python":
        codec.native_tensors()
        codec._tensor_item = codec._tensor_read = codec._c_read_call = codec._c_pack_call = None
        codec._tensor_value = None
    elif codec.native_tensors(exchange_api=name == "exchange") != {"exchange": "exchange API",
                                                                  "capsules": "capsules"}[name]:
        raise SystemExit(f"--tensors={name}: not available here")


def _count(fn, n: int) -> float:
    """Instructions per run of ``fn``: windows of n and 2n runs under callgrind, each
    dumped (the dump resets the counters), their difference over n."""
    totals = []
    for calls in (n, 2 * n):
        _control("-i", "on")
        for _ in range(calls):
            fn()
        _control("-i", "off")
        totals.append(_dump())
    return (totals[1] - totals[0]) / n


_dumps = [0]


def _control(*what: str) -> None:
    subprocess.run(["callgrind_control", *what, str(os.getpid())], check=True,
                   stdout=subprocess.DEVNULL)


def _dump() -> int:
    """Dump the counters; the total of that dump (``--callgrind-out-file=DIR/NAME.%p``)."""
    import glob
    import time

    _control("-d")
    _dumps[0] += 1
    pattern = f"{_OUT}/*{os.getpid()}*.{_dumps[0]}"
    for _ in range(600):
        for path in glob.glob(pattern):
            with open(path) as f:
                for line in f:
                    if line.startswith("totals:"):
                        return int(line.split()[1])
        time.sleep(0.1)
    raise SystemExit(f"no callgrind dump matched {pattern}")


_OUT = os.environ.get("CALL_STEPS_OUT", "/tmp")


if __name__ == "__main__":
    main()
