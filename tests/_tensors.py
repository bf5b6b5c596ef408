"""Hypothesis strategies for the values that cross (tensors of every wire dtype
and layout, scalars) and the comparison of a value with what came back."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
          torch.float16, torch.bfloat16, torch.float32, torch.float64,
          torch.complex64, torch.complex128]

#: What the binary forms carry besides tensors (ints of 64 bits).
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 63) - 1),
                    st.floats(allow_nan=False))


def same(a, b) -> bool:
    """Same dtype, shape and bytes; the received tensor never requires grad."""
    a = a.detach().resolve_conj().resolve_neg()
    return (type(b) is torch.Tensor and a.dtype == b.dtype and a.shape == b.shape
            and not b.requires_grad and b.is_contiguous()
            and (a.numel() == 0 or torch.equal(tensor_bytes(a), tensor_bytes(b))))


def tensor_bytes(t):
    """``t``'s values as bytes (a fresh row-major copy: NaNs compare equal)."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1).view(torch.uint8)


@st.composite
def tensors(draw):
    """A tensor of any wire dtype, 0 to 4 dimensions (sizes 0 to 4), laid out
    plainly or not: transposed, sliced, offset in its storage, requiring grad, a
    Parameter, with the conjugate or negative bit."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=4)))
    t = torch.randint(-50, 100, shape).to(dtype)
    if dtype.is_complex:
        t = t + 1j * torch.randint(-50, 100, shape).to(dtype)
    how = draw(st.sampled_from(["plain", "transposed", "sliced", "offset", "grad", "parameter",
                                "conj", "neg"]))
    if how == "transposed" and t.dim() >= 2:
        t = t.transpose(0, 1)
    elif how == "sliced" and t.dim() >= 1 and t.shape[0] > 1:
        t = t[::2]
    elif how == "offset" and t.dim() >= 1 and t.shape[0] > 1:
        t = t[1:]  # contiguous, but not where its storage starts
    elif how == "grad" and (dtype.is_floating_point or dtype.is_complex):
        t = t.clone().requires_grad_(True)
    elif how == "parameter" and (dtype.is_floating_point or dtype.is_complex):
        t = torch.nn.Parameter(t.clone())
    elif how == "conj" and dtype.is_complex:
        t = t.conj()  # the conjugate bit: the bytes are not the values
    elif how == "neg" and dtype.is_complex:
        t = t.conj().imag  # a float view with the negative bit
    return t
