"""CUDA tensors across processes: CUDA IPC, never through host memory.

A CUDA tensor crosses as torch's own IPC reduction (``cudaIpcGetMemHandle``
plus an event the receiver's stream waits on, plus torch's inter-process
reference counter).  Lifetime rule, enforced here: *the producer's memory must
stay alive until every consumer is done with it*.

* Host -> interpreter (arguments, weights): the host owns the memory.  If the
  interpreter keeps a tensor after the call, torch's IPC reference counter
  keeps the host's block out of the caching allocator until the interpreter
  drops it.
* Interpreter -> host (results): an interpreter can die at any moment and its
  device memory with it, so the host never keeps a mapping of interpreter
  memory: it copies a CUDA result into its own allocation (device to device,
  on the current stream) and lets the mapping go.
"""

from __future__ import annotations

import threading

from .tensors import decoding

_local = threading.local()  # this thread's interpreter stream


def reduce_cuda(t):
    """The pickle reduction of CUDA tensor ``t`` (detached) for another process."""
    from torch.multiprocessing.reductions import reduce_tensor

    rebuild, args = reduce_tensor(t.detach())
    return (rebuild_cuda, (rebuild, args))


def rebuild_cuda(rebuild, args):
    """Open an IPC'd CUDA tensor; a copy of it when the decoding side must own
    what it receives (``Decoder(own_cuda=True)``: the host's results)."""
    t = rebuild(*args)
    decoder = getattr(decoding, "decoder", None)
    if decoder is not None and decoder.own_cuda:
        if decoder.links is not None:
            decoder.links.fell_back(t)  # the host makes room in the link for next time
        return t.clone()  # the mapping is released with `t`, right after the call
    return t


def interpreter_device(devices: int | None = None):
    """The device for this interpreter: ``cuda:i mod n`` (torch::deploy's
    GPUWrapper placement), or the CPU where no GPU is visible.

    >>> str(interpreter_device(0))
    'cpu'
    """
    import torch

    from .._current import interpreter_id

    n = torch.cuda.device_count() if devices is None else devices
    if n <= 0:
        return torch.device("cpu")
    return torch.device("cuda", (interpreter_id() or 0) % n)


def ensure_stream() -> None:
    """Give this interpreter its own CUDA stream (once CUDA is in use here)."""
    import torch

    if getattr(_local, "stream", None) is None and torch.cuda.is_initialized():
        stream = torch.cuda.Stream()
        # Work already queued on the default stream (IPC event waits of the first
        # decoded arguments, the first ops) must finish before the new stream's.
        stream.wait_stream(torch.cuda.default_stream())
        _local.stream = stream
        torch.cuda.set_stream(stream)
