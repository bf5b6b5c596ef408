"""Weights are shared, not copied, between interpreters; replicated objects come and go.

torch::deploy's TensorSerializationSharing and Movable, and ReplicatedObj's
lifetime: ``unload()`` and unloading when the last handle is dropped.
``multipy.shared_location`` names the file mapping (device, inode, offset) that
holds a tensor's bytes: equal locations in two interpreters mean the same
physical pages.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

HELPERS = """
import multipy

def first_parameter(model):
    return next(model.parameters())

def loc(model):
    return multipy.shared_location(next(model.parameters()))

def weight_loc(module):
    return multipy.shared_location(module.weight)

def data_ptr(tensor):
    return tensor.untyped_storage().data_ptr()

def scale(x, factor=2):
    return x * factor

def replicated_count():
    from multipy.interp.state import current_state
    return len(current_state().replicated)
"""


@pytest.fixture(scope="module")
def helpers(manager):
    manager.register_module_source("sharing_helper", HELPERS)
    return manager


def requires_file_mappings(manager):
    if manager.backend != "process":
        pytest.skip(f"shared_location names a file mapping; the {manager.backend} backend "
                    "shares tensors by reference inside one process instead")


def replicated_counts(manager) -> list[int]:
    counts = []
    for interp in manager.all_instances():
        with interp.acquire_session() as s:
            counts.append(s.global_("sharing_helper", "replicated_count")().deref())
    return counts


def test_package_weights_map_the_archive_file_in_every_interpreter(helpers, examples):
    requires_file_mappings(helpers)
    path = examples["resnet"]
    model = helpers.load_package(path).load_pickle("model", "model.pkl")
    locations, weights = [], []
    for interp in helpers.all_instances():
        with model.acquire_session(interp) as s:
            locations.append(s.global_("sharing_helper", "loc")(s.self).deref())
            weights.append(s.global_("sharing_helper", "first_parameter")(s.self).deref())
    assert locations[0] is not None
    assert locations[0] == locations[1]
    device, inode, offset = locations[0]
    assert inode == os.stat(path).st_ino
    assert offset % 64 == 0
    # The bytes at that offset of the archive are the weight itself.
    weight = weights[0]
    assert torch.equal(weight, weights[1])
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.read(weight.numel() * weight.element_size())
    assert raw == weight.detach().contiguous().numpy().tobytes()


def test_a_movable_module_is_usable_after_its_session_closed(helpers):
    first = helpers.all_instances()[0]
    with first.acquire_session() as s:
        module = s.global_("torch.nn", "Module")()
        movable = s.create_movable(module)
    for interp in helpers.all_instances():
        with interp.acquire_session() as s:
            here = s.from_movable(movable)
            assert here.attr("training").deref() is True
            assert s.global_("builtins", "isinstance")(here, s.global_("torch.nn", "Module")).deref()
    assert movable.hasattr("forward") is True
    assert movable.hasattr("no_such_attribute") is False


def test_package_weights_are_one_storage_for_thread_interpreters(helpers, examples):
    if helpers.backend != "thread":
        pytest.skip("only thread interpreters share a storage object; process interpreters "
                    "map the same pages at different addresses (see the shared_location test)")
    model = helpers.load_package(examples["simple"]).load_pickle("model", "model.pkl")
    pointers = []
    for interp in helpers.all_instances():
        with model.acquire_session(interp) as s:
            weight = s.global_("sharing_helper", "first_parameter")(s.self)
            pointers.append(s.global_("sharing_helper", "data_ptr")(weight).deref())
    assert pointers[0] == pointers[1] != 0


def test_a_movable_linear_shares_its_weights_between_interpreters(helpers):
    requires_file_mappings(helpers)
    with helpers.all_instances()[0].acquire_session() as s:
        linear = s.global_("torch.nn", "Linear")(4, 3)
        weight = linear.attr("weight").deref()
        bias = linear.attr("bias").deref()
        movable = s.create_movable(linear)
    x = torch.rand(5, 4)
    expected = x @ weight.T + bias
    locations, outputs = [], []
    for interp in helpers.all_instances():
        with movable.acquire_session(interp) as s:
            locations.append(s.global_("sharing_helper", "weight_loc")(s.self).deref())
            outputs.append(s.self(x).deref())
    assert locations[0] is not None
    assert locations[0] == locations[1]
    torch.testing.assert_close(outputs[0], expected)
    assert torch.equal(outputs[0], outputs[1])
    torch.testing.assert_close(movable(x), expected)


def test_a_function_of_a_registered_module_can_be_made_movable(helpers):
    with helpers.all_instances()[0].acquire_session() as s:
        movable = s.create_movable(s.global_("sharing_helper", "scale"))
    x = torch.arange(4.0)
    for interp in helpers.all_instances():
        with movable.acquire_session(interp) as s:
            assert torch.equal(s.self(x, factor=3).deref(), x * 3)
    assert torch.equal(movable(x), x * 2)


def test_unload_drops_a_replicated_object_from_every_interpreter(helpers, examples):
    model = helpers.load_package(examples["simple"]).load_pickle("model", "model.pkl")
    x = torch.rand(10, 20)
    for interp in helpers.all_instances():
        with model.acquire_session(interp) as s:
            s.self(x).deref()
    assert model.loaded_in() == [0, 1]
    before = replicated_counts(helpers)

    model.unload(helpers.all_instances()[1])
    assert model.loaded_in() == [0]
    after_one = replicated_counts(helpers)
    assert after_one == [before[0], before[1] - 1]

    model.unload()
    assert model.loaded_in() == []
    assert replicated_counts(helpers) == [before[0] - 1, before[1] - 1]

    # Still usable: the next call loads it again where it runs.
    out = model(x)
    assert out.shape == (10, 20)
    assert len(model.loaded_in()) == 1


def test_a_replicated_object_is_unloaded_when_its_last_handle_is_dropped(helpers):
    with helpers.acquire_one() as s:
        movable = s.create_movable(s.global_("torch.nn", "Linear")(2, 2))
    for interp in helpers.all_instances():
        with movable.acquire_session(interp) as s:
            assert s.self.hasattr("weight")
    gc.collect()  # settle objects of earlier tests first
    before = replicated_counts(helpers)
    del movable, s
    gc.collect()
    after = replicated_counts(helpers)
    assert after == [before[0] - 1, before[1] - 1]
