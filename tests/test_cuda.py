"""CUDA across interpreters: weights uploaded once and mapped by CUDA IPC,
CUDA tensors crossing by IPC, a stream per interpreter, device placement.

torch::deploy's GPU tests (SimpleModel on CUDA equal to its JIT reference,
UsesCuda) plus the transport's lifetime rule.  Every test skips with its reason
where no GPU is present; they run on the GPU machine.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

import multipy
from _wait import gone, wait_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device on this machine")

INTERPRETERS = 2


@pytest.fixture(scope="module")
def manager():
    with multipy.InterpreterManager(INTERPRETERS) as m:
        m.register_module_source("gpu_helpers", GPU_HELPERS)
        yield m


GPU_HELPERS = '''
import torch, multipy

def double(x):
    return x * 2

def describe(x):
    return (x.device.type, x.device.index, float(x.sum()))

def stream_and_device():
    x = torch.ones(1, device=multipy.interpreter_device())
    s = torch.cuda.current_stream()
    return (s != torch.cuda.default_stream(), str(x.device))

def allocated():
    return torch.cuda.memory_allocated()

def weight_devices(model):
    return sorted({str(p.device) for p in model.parameters()})
'''


def test_simple_model_on_cuda_equals_its_jit_reference(manager, examples, example_inputs):
    path = examples["simple"]
    (x,) = example_inputs(path)
    model = manager.load_package(path).load_pickle("model", "model.pkl", map_location="cuda:0")
    reference = torch.jit.load(str(path).replace(".pt", "_jit.pt"), map_location="cuda:0")
    for _ in range(3):
        out = model(x.cuda())
        assert out.device.type == "cuda"
        torch.testing.assert_close(out, reference(x.cuda()), rtol=1e-3, atol=1e-5)


def test_uses_cuda_sees_the_gpu_inside_an_interpreter(manager, examples, example_inputs):
    path = examples["uses_cuda"]
    (x,) = example_inputs(path)
    model = manager.load_package(path).load_pickle("model", "model.pkl")
    out = model(x)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), x + 1)
    with manager.acquire_one() as s:
        assert s.global_("torch.cuda", "is_available")().deref() is True


def test_cuda_tensors_cross_by_ipc_not_through_host_memory(manager, monkeypatch):
    from multipy.transport.shm import Arena

    placed = []
    alloc = Arena.alloc
    monkeypatch.setattr(Arena, "alloc", lambda arena, n: placed.append(n) or alloc(arena, n))
    x = torch.arange(12.0, device="cuda").reshape(3, 4)
    with manager.acquire_one() as s:
        double = s.global_("gpu_helpers", "double")
        out = double.call_value(x)
        assert placed == []  # nothing went into the host's shared-memory arena
        device, index, total = s.global_("gpu_helpers", "describe").call_value(x)
    assert (device, index, total) == ("cuda", 0, float(x.sum()))
    assert out.device.type == "cuda"
    torch.testing.assert_close(out, x * 2)


def test_cuda_results_stay_valid_after_their_interpreter_dies(manager):
    x = torch.ones(1000, device="cuda")
    interp = manager.all_instances()[0]
    with interp.acquire_session() as s:
        out = s.global_("gpu_helpers", "double").call_value(x)
        pid = s.global_("os", "getpid")().deref()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), f"pid {pid} to exit")
    torch.cuda.synchronize()
    assert float(out.sum()) == 2000.0  # the host owns a copy, not a mapping of dead memory


def test_weights_are_uploaded_once_and_mapped_by_every_interpreter(manager, examples):
    path = examples["resnet"]
    package = manager.load_package(path)
    before = [None] * len(manager)
    for interp in manager.all_instances():
        with interp.acquire_session() as s:
            before[interp.index] = s.global_("gpu_helpers", "allocated")().deref()
    host_before = torch.cuda.memory_allocated()
    model = package.load_pickle("model", "model.pkl", map_location="cuda:0")
    weights = sum(p.numel() * p.element_size()
                  for p in torch.package.PackageImporter(str(path)).load_pickle("model", "model.pkl").state_dict().values())
    host_growth = torch.cuda.memory_allocated() - host_before
    assert 0.9 * weights <= host_growth <= 1.2 * weights, (host_growth, weights)
    for interp in manager.all_instances():
        with model.acquire_session(interp) as s:
            assert s.global_("gpu_helpers", "weight_devices")(s.self).deref() == ["cuda:0"]
            grown = s.global_("gpu_helpers", "allocated")().deref() - before[interp.index]
            assert grown < 0.05 * weights, f"interpreter {interp.index} allocated its own weights"


def test_each_interpreter_runs_on_its_own_stream_and_device(manager):
    for interp in manager.all_instances():
        with interp.acquire_session() as s:
            own_stream, device = s.global_("gpu_helpers", "stream_and_device")().deref()
        assert own_stream
        assert device == f"cuda:{interp.index % torch.cuda.device_count()}"


def test_after_the_first_call_cuda_tensors_cross_through_the_link(manager, monkeypatch):
    import multipy.transport.cuda as cuda

    x = torch.arange(1000.0, device="cuda")
    interp = manager.all_instances()[0]
    with interp.acquire_session() as s:
        double = s.global_("gpu_helpers", "double")
        torch.testing.assert_close(double.call_value(x), x * 2)  # makes the link if none yet
        # Per-tensor IPC: reduce_cuda for arguments, rebuild_cuda for results.
        ipc = []
        rebuild = cuda.rebuild_cuda
        monkeypatch.setattr(cuda, "reduce_cuda", lambda t: ipc.append("argument") or pytest.fail("IPC'd"))
        monkeypatch.setattr(cuda, "rebuild_cuda", lambda *a: ipc.append("result") or rebuild(*a))
        for i in range(20):
            torch.testing.assert_close(double.call_value(x + i), (x + i) * 2)
    assert ipc == []


def test_tensors_of_every_size_cross_both_ways_as_the_link_grows(manager):
    interp = manager.all_instances()[1]
    with interp.acquire_session() as s:
        double = s.global_("gpu_helpers", "double")
        for numel in (1, 256, 3 << 18, 10 << 20, 20 << 20, 3 << 18, 0):  # up to 80 MB: past the cap
            for _ in range(2):
                x = torch.rand(numel, device="cuda")
                torch.testing.assert_close(double.call_value(x), x * 2)
        y = torch.rand(64, 32, device="cuda").t()  # not contiguous
        torch.testing.assert_close(double.call_value(y), y * 2)
        b = torch.rand(8, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(double.call_value(b), b * 2)


def test_many_host_threads_on_their_own_streams_get_their_own_results(manager):
    """The link's events order every buffer reuse: a missed wait shows up here as
    another thread's numbers."""
    import concurrent.futures

    a = torch.rand(256, 256, device="cuda")

    def work(seed: int):
        torch.cuda.set_stream(torch.cuda.Stream())
        with manager.acquire_one() as s:
            double = s.global_("gpu_helpers", "double")
            for i in range(30):
                x = a * (seed * 100 + i)
                out = double.call_value(x @ x)  # queued work the copy must wait for
                torch.testing.assert_close(out, 2 * (x @ x))
        return seed

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(work, range(8))) == list(range(8))
