"""What every tensor transport shares: dtypes by name and the decoder at work.

A tensor descriptor names its dtype as ``str(dtype)`` (``"torch.float32"``);
:func:`dtype` and :func:`dtype_name` map between the two, importing torch on
first use so that importing a transport module does not import torch.
``decoding.decoder`` is the :class:`~multipy.transport.codec.Decoder` running
on this thread: pickle's rebuild functions (codec's tensor descriptors, CUDA
IPC reductions) ask it how to rebuild what they stand for.

The codec, CUDA IPC (``cuda``) and CUDA links (``cuda_link``) all import this
module, and none of them imports another for these helpers.

>>> dtype_name(dtype("torch.float32"))
'torch.float32'
"""

from __future__ import annotations

import sys
import threading
from typing import Any

__all__ = ["decoding", "dtype", "dtype_name", "numpy_dtype", "strided"]

_DTYPES: dict[str, Any] = {}
_NAMES: dict[Any, str] = {}
_NUMPY: dict[str, Any] = {}

#: ``decoding.decoder``: the Decoder unpickling on this thread, else unset.
decoding = threading.local()


def dtype(name: str):
    """The torch dtype named ``name`` (``"torch.float32"``)."""
    if not _DTYPES:
        _load_dtypes()
    return _DTYPES[name]


def dtype_name(dtype) -> str:
    """The name of torch dtype ``dtype``, as descriptors carry it."""
    name = _NAMES.get(dtype)
    if name is None:
        _load_dtypes()
        name = _NAMES[dtype]
    return name


def _load_dtypes() -> None:
    import torch

    for value in vars(torch).values():
        if isinstance(value, torch.dtype):
            _DTYPES[str(value)] = value
            _NAMES[value] = str(value)


def strided():
    """``torch.strided`` (torch is already imported by whoever holds a tensor)."""
    return sys.modules["torch"].strided


def numpy_dtype(name: str):
    """The numpy dtype with the same bytes as torch dtype ``name``; ``None`` when
    numpy has none (bfloat16, quantized types)."""
    if not _NUMPY:
        import numpy as np

        for torch_name, np_name in (("bool", "bool_"), ("uint8", "uint8"), ("int8", "int8"),
                                    ("int16", "int16"), ("int32", "int32"), ("int64", "int64"),
                                    ("float16", "float16"), ("float32", "float32"),
                                    ("float64", "float64"), ("complex64", "complex64"),
                                    ("complex128", "complex128")):
            _NUMPY["torch." + torch_name] = np.dtype(np_name)
        _NUMPY[""] = None
    return _NUMPY.get(name)
