"""Packaged eager models run inside interpreters and match their references.

torch::deploy's SimpleModel, LoadTextAndBinary, ResNet, FxModule,
MultiSerialSimpleModel, ThreadedSimpleModel, AcquireMultipleSessions…,
UsesDistributed, Autograd, ImportlibMetadata, TestNumpy, TestPyYAML, the
pybind print case and GPU UsesCuda; plus "a call runs under the caller's
autograd mode".
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from multipy.examples import jit_path

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.:DeprecationWarning")

INTERPRETERS = 3  # MultiSerialSimpleModel and ThreadedSimpleModel use three
TOLERANCES = {"rtol": 1e-3, "atol": 1e-5}

HELPERS = """
import torch

def square_sum_grad(values):
    x = torch.tensor(values, requires_grad=True)
    loss = (x * x).sum()
    loss.backward()
    return x.grad

def grad_mode():
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled()
"""


@pytest.fixture(scope="module")
def helpers(manager):
    manager.register_module_source("models_helpers", HELPERS)
    return manager


@pytest.fixture(scope="module")
def load(manager, examples):
    """``load(name)``: the example's model as a ReplicatedObj (one per module)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = manager.load_package(examples[name]).load_pickle("model", "model.pkl")
        return cache[name]

    return get


def jit_reference(examples, name):
    return torch.jit.load(str(jit_path(examples[name])))


def run_in_thread(fn, timeout=60.0):
    """Run ``fn`` in a thread; fail (instead of hanging) if it does not finish."""
    outcome = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # re-raised in the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"deadlock: still running after {timeout} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


# -- models equal their references -------------------------------------------------


def test_simple_model_equals_its_torchscript_reference(load, examples, example_inputs):
    model = load("simple")
    inputs = example_inputs(examples["simple"])
    expected = jit_reference(examples, "simple")(*inputs)
    out = model(*inputs)
    assert isinstance(out, torch.Tensor) and out.shape == (10, 20)
    torch.testing.assert_close(out, expected, **TOLERANCES)


def test_simple_model_equals_its_reference_on_every_interpreter(load, manager, examples):
    model = load("simple")
    x = torch.rand(10, 20)
    expected = jit_reference(examples, "simple")(x)
    for interp in manager.all_instances():
        with model.acquire_session(interp) as s:
            assert s.interpreter_index == interp.index
            torch.testing.assert_close(s.self(x).deref(), expected, **TOLERANCES)


def test_example_inputs_load_through_the_manager(manager, examples, example_inputs):
    package = manager.load_package(examples["simple"])
    host = example_inputs(examples["simple"])
    example = package.load_pickle("model", "example.pkl")
    with example.acquire_session() as s:
        inside = s.self.deref()
    assert isinstance(inside, tuple) and len(inside) == 1
    assert torch.equal(inside[0], host[0])
    with package.acquire_session() as s:
        via_importer = s.self.attr("load_pickle")("model", "example.pkl").deref()
    assert torch.equal(via_importer[0], host[0])


def test_package_text_and_binary_resources_load(manager, examples):
    package = manager.load_package(examples["simple"])
    assert package.load_text("extra_files", "text") == "hello"
    assert package.load_binary("extra_files", "binary") == b"hello"


def test_resnet_equals_its_traced_reference(load, examples, example_inputs):
    model = load("resnet")
    (x,) = example_inputs(examples["resnet"])
    assert x.shape == (1, 3, 224, 224)
    expected = jit_reference(examples, "resnet")(x)
    out = model(x)
    assert out.shape == (1, 1000)
    torch.testing.assert_close(out, expected, **TOLERANCES)


def test_multi_return_nested_tuple_equals_its_reference(load, examples, example_inputs):
    model = load("multi_return")
    (x,) = example_inputs(examples["multi_return"])
    original = x.clone()
    expected = jit_reference(examples, "multi_return")(x)
    out = model(x)
    assert isinstance(out, tuple) and isinstance(out[1], tuple)
    torch.testing.assert_close(out, expected, **TOLERANCES)
    assert torch.equal(x, original)  # masked_fill_ ran on a clone inside


def test_fx_module_with_a_wrapped_leaf_equals_its_reference_over_three_calls(load, examples, example_inputs):
    model = load("simple_leaf_fx")
    reference = jit_reference(examples, "simple_leaf_fx")
    inputs = [example_inputs(examples["simple_leaf_fx"])[0], torch.rand(4, 4), torch.randn(4, 4)]
    for x in inputs:
        torch.testing.assert_close(model(x), reference(x), **TOLERANCES)


def test_batched_model_make_batch_through_a_session(load):
    model = load("batched_model")
    pairs = [(torch.full((2,), float(i)), torch.full((2,), 10.0 * i)) for i in range(5)]
    with model.acquire_session() as s:
        batches = s.self.attr("make_batch")(pairs, {"max_bs": "2"}).deref()
        forward = s.self(pairs[1][0], pairs[1][1]).deref()
    assert [len(b) for b in batches] == [2, 2, 1]
    flat = [pair for batch in batches for pair in batch]
    for (a, b), (ea, eb) in zip(flat, pairs, strict=True):
        assert torch.equal(a, ea) and torch.equal(b, eb)
    assert torch.equal(forward, torch.full((2,), 11.0))


def test_batched_model_make_prediction_through_call_method(load):
    model = load("batched_model")
    pairs = [(torch.rand(3), torch.rand(3)) for _ in range(4)]
    out = model.call_method("make_prediction", pairs)
    assert isinstance(out, list) and len(out) == 4
    for got, (a, b) in zip(out, pairs, strict=True):
        assert torch.equal(got, a + b)
    with pytest.raises(ValueError, match="max_bs"):
        model.call_method("make_batch", pairs, {"max_bs": "0"})


def test_uses_distributed_model_runs_and_distributed_is_available_inside(load, manager):
    model = load("uses_distributed")
    x = torch.rand(4, 4)
    assert torch.equal(model(x), x)
    for interp in manager.all_instances():
        with interp.acquire_session() as s:
            assert s.global_("torch.distributed", "is_available")().deref() is True


def test_uses_cuda_model_runs_on_the_gpu(load):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the uses_cuda example moves its input to the GPU")
    model = load("uses_cuda")
    x = torch.rand(4, 4)
    out = model(x)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), x + 1)


def test_simple_model_moved_to_cuda_equals_its_reference(manager, examples):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: this moves a replicated model to the GPU")
    model = manager.load_package(examples["simple"]).load_pickle("model", "model.pkl")
    x = torch.rand(10, 20)
    expected = jit_reference(examples, "simple")(x)
    with model.acquire_session() as s:
        on_gpu = s.self.attr("cuda")()
        out = on_gpu(x.cuda()).deref()
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), expected, **TOLERANCES)


# -- MultiSerialSimpleModel / ThreadedSimpleModel ----------------------------------


def test_three_serial_calls_on_three_interpreters_are_equal(load, manager, examples):
    assert len(manager) == 3
    model = load("simple")
    x = torch.rand(10, 20)
    expected = jit_reference(examples, "simple")(x)
    before = manager.statistics().interpreters
    outs = [model(x) for _ in range(3)]
    after = manager.statistics().interpreters
    for out in outs:
        torch.testing.assert_close(out, expected, **TOLERANCES)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    assert sum(a.calls > b.calls for a, b in zip(after, before)) >= 2


def test_keyword_arguments_reach_forward(load, examples):
    model = load("simple")
    x = torch.rand(10, 20)
    expected = jit_reference(examples, "simple")(x)
    torch.testing.assert_close(model(input=x), expected, **TOLERANCES)
    with pytest.raises(TypeError, match="not_an_argument"):
        model(not_an_argument=x)


def test_hasattr_sees_forward_but_not_make_prediction(load):
    model = load("simple")
    assert model.hasattr("forward") is True
    assert model.hasattr("make_prediction") is False
    assert load("batched_model").hasattr("make_prediction") is True


def test_three_threads_share_one_replicated_model_over_three_interpreters(load, manager, examples):
    model = load("simple")
    reference = jit_reference(examples, "simple")
    calls_per_thread = 100
    inputs = [torch.rand(10, 20) for _ in range(3)]
    expected = [reference(x) for x in inputs]
    errors: list[str] = []
    barrier = threading.Barrier(3)

    def worker(k):
        barrier.wait()
        for i in range(calls_per_thread):
            out = model(inputs[k])
            if not torch.allclose(out, expected[k], **TOLERANCES):
                errors.append(f"thread {k} call {i}: wrong result")

    before = manager.statistics().interpreters
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a thread never finished"
    after = manager.statistics().interpreters
    assert errors == []
    assert sum(a.calls - b.calls for a, b in zip(after, before)) >= 3 * calls_per_thread
    assert sum(a.calls > b.calls for a, b in zip(after, before)) >= 2
    assert all(a.failures == b.failures for a, b in zip(after, before))


# -- AcquireMultipleSessions ------------------------------------------------------


def test_two_live_sessions_in_the_same_package_do_not_deadlock(manager, examples):
    package = manager.load_package(examples["simple"])
    x = torch.rand(10, 20)
    expected = jit_reference(examples, "simple")(x)

    def both():
        with package.acquire_session() as a, package.acquire_session() as b:
            model_a = a.self.attr("load_pickle")("model", "model.pkl")
            model_b = b.self.attr("load_pickle")("model", "model.pkl")
            return model_a(x).deref(), model_b(x).deref()

    out_a, out_b = run_in_thread(both)
    torch.testing.assert_close(out_a, expected, **TOLERANCES)
    torch.testing.assert_close(out_b, expected, **TOLERANCES)


def test_two_live_sessions_in_different_packages_do_not_deadlock(manager, examples):
    simple = manager.load_package(examples["simple"])
    multi = manager.load_package(examples["multi_return"])
    x, y = torch.rand(10, 20), torch.rand(5, 5)

    def both():
        with simple.acquire_session() as a, multi.acquire_session() as b:
            model_a = a.self.attr("load_pickle")("model", "model.pkl")
            model_b = b.self.attr("load_pickle")("model", "model.pkl")
            return model_a(x).deref(), model_b(y).deref()

    out_a, out_b = run_in_thread(both)
    torch.testing.assert_close(out_a, jit_reference(examples, "simple")(x), **TOLERANCES)
    torch.testing.assert_close(out_b, jit_reference(examples, "multi_return")(y), **TOLERANCES)


def test_two_live_sessions_on_one_interpreter_do_not_deadlock(load, manager):
    model = load("simple")
    interp = manager.all_instances()[0]
    x = torch.rand(10, 20)

    def both():
        with model.acquire_session(interp) as a, model.acquire_session(interp) as b:
            assert a.interpreter_index == b.interpreter_index == 0
            return a.self(x).deref(), b.self(x).deref(), model(x)

    out_a, out_b, out_c = run_in_thread(both)
    assert torch.equal(out_a, out_b) and torch.equal(out_b, out_c)


# -- autograd ---------------------------------------------------------------------


def test_backward_inside_two_interpreters_gives_equal_gradients(helpers):
    values = [1.0, -2.0, 3.5]
    grads = []
    for interp in helpers.all_instances()[:2]:
        with interp.acquire_session() as s:
            grads.append(s.global_("models_helpers", "square_sum_grad")(values).deref())
    expected = 2 * torch.tensor(values)
    assert torch.equal(grads[0], expected)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize(
    "mode, expected",
    [("default", (True, False)), ("no_grad", (False, False)), ("inference_mode", (False, True))],
)
def test_calls_run_under_the_callers_autograd_mode(helpers, mode, expected):
    contexts = {"default": torch.enable_grad, "no_grad": torch.no_grad,
                "inference_mode": torch.inference_mode}
    with helpers.acquire_one() as s:
        fn = s.global_("models_helpers", "grad_mode")
        replicated = s.create_movable(s.global_("_types", "grad_mode"))
        with contexts[mode]():
            via_obj = fn().deref()
            via_value = fn.call_value()
            via_replicated = replicated()
    assert tuple(via_obj) == expected
    assert tuple(via_value) == expected
    assert tuple(via_replicated) == expected


# -- the environment inside an interpreter ------------------------------------------


def test_importlib_metadata_sees_torch_inside(manager):
    with manager.acquire_one() as s:
        version = s.global_("importlib.metadata", "version")("torch").deref()
    assert version == torch.__version__


def test_numpy_matmul_inside_an_interpreter(manager):
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 4)), rng.random((4, 2))
    with manager.acquire_one() as s:
        out = s.global_("numpy", "matmul")(a, b).deref()
        ones = s.global_("numpy", "ones")((2, 2)).deref()
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, a @ b)
    np.testing.assert_array_equal(ones, np.ones((2, 2)))


def test_pyyaml_round_trips_inside_an_interpreter(manager):
    pytest.importorskip("yaml", reason="PyYAML is not installed (pip install multipy[test])")
    data = {"name": "multipy", "sizes": [1, 2, 3], "nested": {"ok": True, "ratio": 0.5}}
    with manager.acquire_one() as s:
        text = s.global_("yaml", "safe_dump")(data).deref()
        back = s.global_("yaml", "safe_load")(text).deref()
    assert isinstance(text, str) and "multipy" in text
    assert back == data


def test_print_inside_an_interpreter_reaches_the_host_stdout(manager, capsys):
    for interp in manager.all_instances():
        with interp.acquire_session() as s:
            s.global_("builtins", "print")(f"hello from {interp.index}!")
    out = capsys.readouterr().out
    for interp in manager.all_instances():
        assert f"hello from {interp.index}!" in out
