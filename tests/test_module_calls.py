"""Calling an ``nn.Module`` replicated in an interpreter: its ``forward`` runs
directly when torch's own ``nn.Module.__call__`` would do nothing else, and
every kind of hook still runs once registered, even after calls went the
direct way; the caller's autograd mode holds inside the call.
"""

from __future__ import annotations

import pytest
import torch

from multipy.interp import state as interp_state

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.:DeprecationWarning")

INTERPRETERS = 1  # every call of a test reaches the interpreter its hooks are in

MODULES = """
import torch

seen = []

class Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((1,), 2.0))

    def forward(self, x):
        seen.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        return (x * self.w).detach()

def add_one(module, args):
    return (args[0] + 1,)

def times_ten(module, args, output):
    return output * 10

def register(kind, module):
    hooks = {
        "forward_pre": lambda: module.register_forward_pre_hook(add_one),
        "forward": lambda: module.register_forward_hook(times_ten),
        "global_forward_pre": lambda: torch.nn.modules.module.register_module_forward_pre_hook(add_one),
        "global_forward": lambda: torch.nn.modules.module.register_module_forward_hook(times_ten),
    }
    return hooks[kind]()

def remove(handle):
    handle.remove()

def last_mode():
    return seen[-1]
"""


@pytest.fixture(scope="module")
def scale(manager):
    """A replicated ``Scale`` (``x * 2``) and a session on its one interpreter."""
    manager.register_module_source("module_calls", MODULES)
    with manager.acquire_one() as s:
        model = s.create_movable(s.global_("module_calls", "Scale")())
    model.load_everywhere()
    return model


@pytest.mark.parametrize("kind, expected", [
    ("forward_pre", [4.0, 6.0]),          # (x + 1) * 2
    ("forward", [20.0, 40.0]),            # x * 2 * 10
    ("global_forward_pre", [4.0, 6.0]),
    ("global_forward", [20.0, 40.0]),
])
def test_a_hook_registered_after_calls_runs_on_the_next_call(manager, scale, kind, expected):
    x = torch.tensor([1.0, 2.0])
    assert scale(x).tolist() == [2.0, 4.0]  # no hook: forward, directly
    with scale.acquire_session(manager.all_instances()[0]) as s:
        handle = s.global_("module_calls", "register")(kind, s.self)
        try:
            assert scale(x).tolist() == expected
        finally:
            s.global_("module_calls", "remove")(handle)
    assert scale(x).tolist() == [2.0, 4.0]  # removed: direct again


@pytest.mark.parametrize("mode, expected", [
    (torch.enable_grad, (True, False)), (torch.no_grad, (False, False)),
    (torch.inference_mode, (False, True)),
])
def test_a_module_runs_under_the_callers_autograd_mode(manager, scale, mode, expected):
    with mode():
        scale(torch.ones(1))
    with manager.acquire_one() as s:
        assert tuple(s.global_("module_calls", "last_mode")().deref()) == expected


# -- the decision itself, in this process: every condition of nn.Module._call_impl --

class _Plain(torch.nn.Module):
    def forward(self, x):
        return x


def _direct(module):
    calls = interp_state._TorchCalls(torch)
    return interp_state._direct_forward(module, calls)


def test_a_module_without_hooks_is_called_through_forward():
    m = _Plain()
    assert _direct(m) == m.forward


@pytest.mark.parametrize("register", [
    lambda m: m.register_forward_pre_hook(lambda *a: None),
    lambda m: m.register_forward_hook(lambda *a: None),
    lambda m: m.register_full_backward_hook(lambda *a: None),
    lambda m: m.register_full_backward_pre_hook(lambda *a: None),
    lambda m: m.register_backward_hook(lambda *a: None),
    lambda m: torch.nn.modules.module.register_module_forward_pre_hook(lambda *a: None),
    lambda m: torch.nn.modules.module.register_module_forward_hook(lambda *a: None),
    lambda m: torch.nn.modules.module.register_module_full_backward_hook(lambda *a: None),
    lambda m: torch.nn.modules.module.register_module_full_backward_pre_hook(lambda *a: None),
], ids=["forward_pre", "forward", "full_backward", "full_backward_pre", "backward",
        "global_forward_pre", "global_forward", "global_full_backward", "global_full_backward_pre"])
def test_any_hook_makes_the_call_go_through_nn_module(register):
    m = _Plain()
    handle = register(m)
    try:
        assert _direct(m) is m
    finally:
        handle.remove()
    assert _direct(m) == m.forward


def test_a_compiled_module_or_its_own_call_goes_through_nn_module():
    m = _Plain()
    m._compiled_call_impl = lambda *a: None  # what Module.compile() sets
    assert _direct(m) is m

    class OwnCallImpl(_Plain):
        def _call_impl(self, *args, **kwargs):
            return -args[0]

    m = OwnCallImpl()
    assert _direct(m) is m
    assert interp_state._run(m, (torch.ones(1),), {}, None).tolist() == [-1.0]

    class OwnCall(_Plain):
        def __call__(self, x):
            return -x

    assert interp_state._run(OwnCall(), (torch.ones(1),), {}, None).tolist() == [-1.0]


def test_a_module_called_while_tracing_goes_through_nn_module():
    m = _Plain()
    seen = []

    def traced(x):
        seen.append(_direct(m) is m)
        return x

    torch.jit.trace(traced, torch.ones(1), check_trace=False)
    assert seen == [True]


def test_a_module_run_while_tracing_is_called_through_nn_module():
    # Under a trace nn.Module's call runs _slow_forward (it records scopes): _run
    # (and the extension's run_call) must not call forward directly then.
    seen = []

    class Traced(_Plain):
        def _slow_forward(self, *args):
            seen.append("slow")
            return self.forward(*args)

    m = Traced()
    torch.jit.trace(lambda x: interp_state._run(m, (x,), {}, None), torch.ones(1),
                    check_trace=False)
    assert seen == ["slow"]
    assert interp_state._run(m, (torch.ones(1),), {}, None).tolist() == [1.0]
    assert seen == ["slow"]  # not tracing: forward, directly


def test_an_instance_forward_is_the_one_called():
    m = _Plain()
    m.forward = lambda x: x + 1
    assert interp_state._run(m, (torch.ones(1),), {}, None).tolist() == [2.0]
