"""Whatever a caller passes to a replicated object, it gets what the same call
in the host gives, or a clear error, never a crash.

The common call goes through the extension on both sides on the process
backend (the host's Caller and pack_call, the interpreter's serving loop): the
arguments and the one value that comes back are written and read in C unless C
leaves them to the Python path.  Hypothesis draws the values (tensors of every
wire dtype, 0-d, empty, non-contiguous, requiring grad, Parameters, with the
conjugate or negative bit; ints past 64 bits, floats, complex numbers, None,
bools, strings, containers, keyword arguments) and checks each call, blocking
and posted, against the direct call.  The same module runs with
``MULTIPY_NATIVE=0`` (the Makefile's second run): both paths give the direct
call's answer.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _tensors import same, scalars, tensors
from multipy import MultipyError

INTERPRETERS = 1

SOURCE = '''
def value(x):
    return x

def both(*args, **kwargs):
    return args, kwargs
'''

odd_scalars = st.one_of(scalars, st.floats(), st.integers(1 << 63, 1 << 80).map(lambda v: -v),
                        st.integers(1 << 63, 1 << 80), st.complex_numbers(), st.text(max_size=4),
                        st.binary(max_size=4))
values = st.one_of(odd_scalars, tensors())
nested = st.one_of(values, st.lists(values, max_size=3), st.tuples(values, values),
                   st.dictionaries(st.text(max_size=3), values, max_size=2))

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def functions(manager):
    manager.register_module_source("odd_arguments", SOURCE)
    with manager.acquire_one() as s:
        return (s.create_movable(s.global_("odd_arguments", "value")),
                s.create_movable(s.global_("odd_arguments", "both")))


def _call(obj, how, *args, **kwargs):
    if how == "blocking":
        return obj(*args, **kwargs)
    return obj.submit(*args, **kwargs).result(timeout=60)


def _agree(expected, got) -> bool:
    """``got`` (what came back) is ``expected`` (the direct call's value).  A tensor
    comes back as a plain contiguous copy (on the thread backend, which passes
    objects by reference, as itself)."""
    if isinstance(expected, torch.Tensor):
        return got is expected or same(expected, got)
    if isinstance(expected, (list, tuple)):
        return (type(got) is type(expected) and len(got) == len(expected)
                and all(_agree(a, b) for a, b in zip(expected, got)))
    if isinstance(expected, dict):
        return (type(got) is dict and got.keys() == expected.keys()
                and all(_agree(expected[k], got[k]) for k in expected))
    if isinstance(expected, float) and math.isnan(expected):
        return type(got) is float and math.isnan(got)
    if isinstance(expected, complex) and (math.isnan(expected.real) or math.isnan(expected.imag)):
        return type(got) is complex and repr(got) == repr(expected)
    return type(got) is type(expected) and got == expected


@pytest.mark.parametrize("how", ["blocking", "posted"])
@SETTINGS
@given(x=nested)
def test_one_value_comes_back_as_it_went(functions, how, x):
    value, _ = functions
    got = _call(value, how, x)
    assert _agree(x, got), (x, got)


@pytest.mark.parametrize("how", ["blocking", "posted"])
@SETTINGS
@given(args=st.lists(values, max_size=4), kwargs=st.dictionaries(
    st.sampled_from(["a", "b", "weight"]), values, max_size=2))
def test_positional_and_keyword_arguments_come_back_as_they_went(functions, how, args, kwargs):
    _, both = functions
    got = _call(both, how, *args, **kwargs)
    assert _agree((tuple(args), kwargs), got), (args, kwargs, got)


def test_a_large_tensor_and_a_dtype_mix_come_back_as_they_went(functions):
    value, both = functions
    large = torch.randn(2048, 1024)  # 8 MiB: a block of its own, larger than a size class
    assert _agree(large, value(large))
    strided = large[:, ::3]
    assert _agree(strided, value.submit(strided).result(timeout=60))
    mix = (torch.ones(3, dtype=torch.float16), torch.arange(4), torch.tensor(True),
           torch.zeros(0, 5, dtype=torch.complex64), 2 ** 70, -0.0, None)
    assert _agree((mix, {"k": torch.tensor(1.5, dtype=torch.bfloat16)}),
                  both(*mix, k=torch.tensor(1.5, dtype=torch.bfloat16)))


@pytest.mark.parametrize("odd", [lambda: 1, object(), (i for i in range(3)),
                                 torch.ones(2, device="meta"),
                                 torch.ones(4).to_sparse()],
                         ids=["lambda", "object", "generator", "meta tensor", "sparse tensor"])
def test_an_argument_that_cannot_cross_is_a_clear_error_or_its_own_value(functions, manager, odd):
    value, _ = functions
    for how in ("blocking", "posted"):
        try:
            got = _call(value, how, odd)
        except MultipyError as exc:  # it cannot cross: said so, with what it is
            assert str(exc)
        except Exception as exc:  # noqa: BLE001 (the interpreter's own error, e.g. meta)
            assert type(exc).__module__ != "builtins" or str(exc), exc
        else:
            if isinstance(odd, torch.Tensor) and not odd.is_meta:
                assert torch.equal(odd.to_dense(), got.to_dense())
    assert value(3) == 3  # and the interpreter still serves
