"""Values cross between the host and an interpreter exactly, tensors through shared memory.

What crosses the boundary: every dtype, nested structures,
non-contiguous views, 0-dim and empty tensors, tensors that require grad
(detached on the way), results that stay valid, large tensors, and no pickling
of tensor bytes.  Each value goes through an identity function twice: as a
``ReplicatedObj`` call (balanced) and as ``Obj(...).deref()`` in a session.
"""

from __future__ import annotations

import gc

import pytest
import torch
from _types import Pair, Point

import multipy

HELPERS = """
import multipy
import torch

def ident(*args, **kwargs):
    return args, kwargs

def location(t):
    return multipy.shared_location(t)

def describe(t):
    return {"requires_grad": t.requires_grad, "is_leaf": t.is_leaf, "shape": tuple(t.shape),
            "dtype": str(t.dtype)}

def with_grad():
    x = torch.ones(3, requires_grad=True)
    return x * 2
"""

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
          torch.float16, torch.bfloat16, torch.float32, torch.float64,
          torch.complex64, torch.complex128]


@pytest.fixture(scope="module")
def helpers(manager):
    manager.register_module_source("transport_helpers", HELPERS)
    return manager


@pytest.fixture(scope="module")
def replicated_ident(helpers):
    with helpers.acquire_one() as s:
        return s.create_movable(s.global_("_types", "ident"))


@pytest.fixture(scope="module", params=["replicated_call", "obj_deref"])
def ident(request, helpers, replicated_ident):
    """``ident(*args, **kwargs) -> (args, kwargs)`` run inside an interpreter."""
    if request.param == "replicated_call":
        return replicated_ident

    def via_session(*args, **kwargs):
        with helpers.acquire_one() as s:
            return s.global_("transport_helpers", "ident")(*args, **kwargs).deref()

    return via_session


def requires_shared_memory(manager):
    if manager.backend != "process":
        pytest.skip(f"the {manager.backend} backend passes tensors in-process, not through "
                    "shared memory segments")


def sample(dtype: torch.dtype) -> torch.Tensor:
    """A 4x5 tensor of ``dtype`` with random values and the dtype's extremes."""
    g = torch.Generator().manual_seed(1)
    if dtype is torch.bool:
        return torch.randint(0, 2, (4, 5), generator=g).bool()
    if dtype.is_complex:
        t = torch.randn(4, 5, dtype=dtype, generator=g)
        t[0, 0] = complex(float("inf"), float("nan"))
        return t
    if dtype.is_floating_point:
        info = torch.finfo(dtype)
        t = (torch.randn(4, 5, generator=g) * 100).to(dtype)
        t[0, :4] = torch.tensor([info.max, info.min, info.tiny, float("nan")]).to(dtype)
        t[1, 0] = float("-inf")
        return t
    info = torch.iinfo(dtype)
    t = torch.randint(info.min, info.max, (4, 5), dtype=dtype, generator=g)
    t[0, 0], t[0, 1] = info.min, info.max
    return t


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert isinstance(got, torch.Tensor)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.device == want.device
    as_bytes = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # NaN == NaN bitwise
    assert torch.equal(as_bytes(got), as_bytes(want))


def assert_same_structure(got, want, where="value"):
    assert type(got) is type(want), f"{where}: {type(got)} is not {type(want)}"
    if isinstance(want, torch.Tensor):
        assert_bitwise_equal(got, want)
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for k in want:
            assert_same_structure(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_structure(g, w, f"{where}[{i}]")
    elif isinstance(want, Pair):
        assert_same_structure(got.first, want.first, f"{where}.first")
        assert_same_structure(got.second, want.second, f"{where}.second")
    else:
        assert got == want, where


# -- dtypes and shapes ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_round_trips_bit_for_bit(ident, dtype):
    t = sample(dtype)
    args, kwargs = ident(t, keyword=t)
    assert kwargs.keys() == {"keyword"}
    assert_bitwise_equal(args[0], t)
    assert_bitwise_equal(kwargs["keyword"], t)


def test_nested_structures_keep_their_types_both_ways(ident):
    a, b, c = torch.rand(2, 3), torch.arange(4), torch.ones(1, dtype=torch.float64)
    value = {
        "tuple": (a, [b, {"inner": c}]),
        "point": Point(a, 3),
        "pair": Pair(b, "text"),
        "scalars": [None, 1, 2.5, True, "str", b"bytes", 3 + 4j],
        "empty": ((), [], {}),
    }
    args, kwargs = ident(value, 7, key=[value["point"]])
    assert_same_structure(args, (value, 7))
    assert_same_structure(kwargs, {"key": [value["point"]]})
    assert isinstance(args[0]["point"], Point) and args[0]["point"].y == 3
    assert isinstance(args[0]["pair"], Pair) and args[0]["pair"].second == "text"


@pytest.mark.parametrize("make", [
    lambda: torch.arange(24.0).reshape(4, 6).t(),
    lambda: torch.arange(40)[::3],
    lambda: torch.arange(30.0).reshape(5, 6)[1:4, 2:],
    lambda: torch.rand(3, 1).expand(3, 4),
    lambda: torch.randn(2, 3, 4, 5).permute(3, 1, 0, 2),
    lambda: torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last),
    lambda: torch.randn(3, 4, dtype=torch.complex64).conj(),
], ids=["transpose", "step", "offset_slice", "expand", "permute", "channels_last", "conj_view"])
def test_non_contiguous_views_round_trip_by_value(ident, make):
    t = make()
    (got,), _ = ident(t)
    assert got.shape == t.shape and got.dtype == t.dtype
    assert torch.equal(got, t)
    assert not got.is_conj()


def test_zero_dim_tensors_round_trip(ident):
    values = (torch.tensor(3.5), torch.tensor(-7), torch.tensor(True), torch.tensor(1 + 2j))
    got, _ = ident(*values)
    for g, w in zip(got, values, strict=True):
        assert g.dim() == 0
        assert_bitwise_equal(g, w)
        assert g.item() == w.item()


def test_empty_tensors_round_trip(ident):
    values = (torch.empty(0, 3), torch.empty(0, dtype=torch.int64), torch.zeros(2, 0, 4, dtype=torch.bool))
    got, _ = ident(*values)
    for g, w in zip(got, values, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype and g.numel() == 0


# -- autograd ------------------------------------------------------------------------


def test_a_tensor_that_requires_grad_arrives_detached(helpers, ident):
    t = torch.rand(3, requires_grad=True)
    with helpers.acquire_one() as s:
        inside = s.global_("transport_helpers", "describe")(t).deref()
        produced = s.global_("transport_helpers", "with_grad")().deref()
    assert inside["requires_grad"] is False and inside["is_leaf"] is True
    (back,), _ = ident(t)
    assert back.requires_grad is False
    assert torch.equal(back, t.detach())
    assert produced.requires_grad is False and produced.grad_fn is None
    assert torch.equal(produced, torch.full((3,), 2.0))
    assert t.requires_grad and t.grad is None  # the host tensor is untouched


def test_a_parameter_arrives_detached_both_ways(helpers):
    parameter = torch.nn.Parameter(torch.rand(3))
    with helpers.acquire_one() as s:
        inside = s.global_("transport_helpers", "describe")(parameter).deref()
        weight = s.global_("torch.nn", "Linear")(2, 2).attr("weight").deref()
    assert inside["requires_grad"] is False
    assert weight.requires_grad is False


# -- lifetimes and sizes -------------------------------------------------------------


def test_results_stay_valid_while_later_calls_reuse_memory(ident):
    kept = [ident(torch.full((1000,), float(i)))[0][0] for i in range(50)]
    for i in range(100, 150):  # each result dies at once: its block is reused by the next
        (later,), _ = ident(torch.full((1000,), float(i)))
        assert torch.equal(later, torch.full((1000,), float(i)))
        del later
    for i, t in enumerate(kept):
        assert torch.equal(t, torch.full((1000,), float(i))), f"result {i} was overwritten"


def test_an_image_sized_tensor_round_trips(ident):
    t = torch.randn(1, 3, 224, 224)
    (got,), _ = ident(t)
    assert torch.equal(got, t)


def test_a_64_megabyte_tensor_round_trips(ident):
    t = torch.randn(16 * 1024 * 1024)  # 64 MB of float32
    (got,), _ = ident(t)
    assert got.shape == t.shape
    assert torch.equal(got, t)
    del got
    gc.collect()
    (small,), _ = ident(torch.ones(3))  # the pool still works after the big block is freed
    assert torch.equal(small, torch.ones(3))


# -- tensors are not pickled by value -------------------------------------------------


def test_result_tensors_live_in_shared_memory(helpers, ident):
    requires_shared_memory(helpers)
    (got,), _ = ident(torch.rand(256))
    assert multipy.shared_location(got) is not None
    assert multipy.shared_location(torch.rand(256)) is None


def test_argument_tensors_live_in_shared_memory_inside(helpers):
    requires_shared_memory(helpers)
    with helpers.acquire_one() as s:
        location = s.global_("transport_helpers", "location")
        assert location(torch.rand(256)).deref() is not None
        made_inside = s.global_("torch", "rand")(256)
        assert location(made_inside).deref() is None  # private memory: the check can fail


def test_a_result_passed_back_is_not_copied(helpers):
    requires_shared_memory(helpers)
    interp = helpers.all_instances()[0]
    with interp.acquire_session() as s:
        result = s.global_("transport_helpers", "ident")(torch.rand(256)).deref()[0][0]
        host_location = multipy.shared_location(result)
        inside_location = s.global_("transport_helpers", "location")(result).deref()
    assert host_location is not None
    assert inside_location == host_location


def test_thread_interpreters_receive_the_callers_tensor_itself(helpers):
    if helpers.backend != "thread":
        pytest.skip(f"only thread interpreters share the host's memory; the {helpers.backend} "
                    "backend passes tensors through shared memory segments")
    t = torch.rand(256)
    with helpers.acquire_one() as s:
        pointer = s.global_("builtins", "getattr")(t, "data_ptr")().deref()
        (back,), _ = s.global_("_types", "ident")(t).deref()
    assert pointer == t.data_ptr()
    assert back.data_ptr() == t.data_ptr()


def test_a_result_that_views_an_argument_comes_back_without_a_copy(manager):
    if manager.backend != "process":
        pytest.skip("only the process backend has argument arenas to hand back")
    x = torch.arange(256 * 1024, dtype=torch.float32)
    with manager.all_instances()[0].acquire_session() as s:
        echo = s.global_("builtins", "eval")("lambda t: t[10:]")
        out = echo.call_value(x)
        copied = s.global_("torch", "clone").call_value(x)  # a new tensor: the results arena
        location, results = multipy.shared_location(out), multipy.shared_location(copied)
        assert location is not None and results is not None
        assert location[1] != results[1]  # not in the results arena: the argument's own block
        kept = [echo.call_value(x * i) for i in range(1, 6)]  # the held blocks are not reused
        assert torch.equal(out, x[10:])
        for i, t in enumerate(kept, start=1):
            assert torch.equal(t, (x * i)[10:])


def test_a_result_handed_back_and_kept_by_the_interpreter_stays_intact(manager):
    if manager.backend != "process":
        pytest.skip("only the process backend hands result blocks back by reference")
    with manager.all_instances()[0].acquire_session() as s:
        make = s.global_("torch", "full")
        s.exec_("import builtins\nbuiltins._multipy_kept = []\nresult = None")
        stash = s.global_("builtins", "eval")("lambda t: (__import__('builtins')._multipy_kept.append(t), t.sum())[1]")
        first = make.call_value((1000,), 7.0)          # lives in the interpreter's results arena
        assert float(stash.call_value(first)) == 7000.0  # handed back by reference, kept there
        del first
        for i in range(20):                             # the host frees; new results must not reuse it
            make.call_value((1000,), float(i))
        total = s.global_("builtins", "eval")("lambda: float(__import__('builtins')._multipy_kept[0].sum())")
        assert total.call_value() == 7000.0
