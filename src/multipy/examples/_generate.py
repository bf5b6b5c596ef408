"""Build the example models and write them as ``torch.package`` archives.

Mirrors pytorch/multipy's ``generate_examples.py``: for every example
``<name>`` :func:`generate` writes ``<out>/<name>.pt`` (a torch.package with
``model/model.pkl`` and ``model/example.pkl``) and, where TorchScript can
express the model, a reference ``<out>/<name>_jit.pt`` (``torch.jit.save``).

Example:
    >>> paths = generate("/tmp/examples", names=["simple"])
    >>> paths["simple"].name, jit_path(paths["simple"]).name
    ('simple.pt', 'simple_jit.pt')
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from ..package.export import save_package
from . import models

__all__ = ["EXAMPLES", "Example", "generate", "jit_path"]

#: Modules copied into every archive; torch and the stdlib are externed implicitly.
INTERN = ("multipy.examples.**",)

Builder = Callable[[], tuple[nn.Module, tuple[Tensor, ...]]]


@dataclass(frozen=True)
class Example:
    """One example archive: how to build it and how to make its reference.

    ``build`` returns ``(model, example_inputs)``; ``jit`` says how the
    ``_jit.pt`` reference is made (``None``: TorchScript cannot express it).
    ``extra_files`` pairs ``"package/resource"`` names with their content.

    Example:
        >>> EXAMPLES["simple"].jit
        'script'
    """

    name: str
    description: str
    build: Builder
    jit: Literal["script", "trace"] | None = None
    extra_files: tuple[tuple[str, str | bytes], ...] = ()

    @property
    def has_jit(self) -> bool:
        """Whether a ``<name>_jit.pt`` TorchScript reference is written."""
        return self.jit is not None


def _simple() -> tuple[nn.Module, tuple[Tensor, ...]]:
    return models.Simple(10, 20), (torch.rand(10, 20),)


def _resnet() -> tuple[nn.Module, tuple[Tensor, ...]]:
    return models.resnet18().eval(), (torch.randn(1, 3, 224, 224),)


def _multi_return() -> tuple[nn.Module, tuple[Tensor, ...]]:
    return models.MultiReturn(), (torch.rand(5, 5),)


def _batched_model() -> tuple[nn.Module, tuple[Tensor, ...]]:
    return models.BatchedModel(), (torch.rand(8, 4), torch.rand(8, 4))


def _simple_leaf_fx() -> tuple[nn.Module, tuple[Tensor, ...]]:
    return torch.fx.symbolic_trace(models.LeafFx()), (torch.rand(4, 4),)


def _uses_distributed() -> tuple[nn.Module, tuple[Tensor, ...]]:
    return models.UsesDistributed(), (torch.rand(4, 4),)


def _uses_cuda() -> tuple[nn.Module, tuple[Tensor, ...]]:
    return models.UsesCuda(), (torch.rand(4, 4),)


def _smallops() -> tuple[nn.Module, tuple[Tensor, ...]]:
    return models.SmallOps(n_layers=40, width=16), (torch.randn(1, 16),)


def _identity() -> tuple[nn.Module, tuple[Tensor, ...]]:
    return models.Identity(), (torch.randn(1, 16),)


EXAMPLES: dict[str, Example] = {
    example.name: example
    for example in (
        Example(
            "simple",
            "weight + input; archive also holds extra_files/text and extra_files/binary",
            _simple,
            jit="script",
            extra_files=(("extra_files/text", "hello"), ("extra_files/binary", b"hello")),
        ),
        Example("resnet", "ResNet-18, eval mode, 1x3x224x224 input", _resnet, "trace"),
        Example("multi_return", "returns a nested tuple", _multi_return, "script"),
        Example(
            "batched_model",
            "i1 + i2, plus make_prediction/make_batch methods",
            _batched_model,
        ),
        Example(
            "simple_leaf_fx",
            "fx GraphModule calling a torch.fx.wrap'ped leaf function",
            _simple_leaf_fx,
            "script",
        ),
        Example(
            "uses_distributed",
            "identity asserting torch.distributed is available",
            _uses_distributed,
        ),
        Example("uses_cuda", "moves input to CUDA; needs a GPU to run", _uses_cuda),
        Example("smallops", "40 residual Linear(16, 16) layers", _smallops, "script"),
        Example("identity", "returns its input: dispatch overhead", _identity, "script"),
    )
}


def jit_path(archive: str | Path) -> Path:
    """Path of the TorchScript reference that sits next to ``archive``.

    Example:
        >>> jit_path("out/simple.pt")
        PosixPath('out/simple_jit.pt')
    """
    archive = Path(archive)
    return archive.with_name(f"{archive.stem}_jit.pt")


def generate(out_dir: str | Path, names: Iterable[str] | None = None) -> dict[str, Path]:
    """Write the example archives (all, or only ``names``) into ``out_dir``.

    Every model is built right after ``torch.manual_seed(0)`` (the caller's RNG
    state is left untouched), so archives are deterministic whatever subset is
    asked for.  Returns ``{name: <out_dir>/<name>.pt}`` in request order.

    Example:
        >>> generate("/tmp/examples", ["identity"])
        {'identity': PosixPath('/tmp/examples/identity.pt')}
    """
    selected = list(EXAMPLES) if names is None else list(dict.fromkeys(names))
    unknown = [name for name in selected if name not in EXAMPLES]
    if unknown:
        raise ValueError(f"unknown example(s) {unknown}; known: {sorted(EXAMPLES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {name: _write_example(EXAMPLES[name], out) for name in selected}


def _write_example(example: Example, out: Path) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, inputs = example.build()
    archive = save_package(
        out / f"{example.name}.pt",
        model,
        intern=INTERN,
        example_inputs=inputs,
        extra_files=dict(example.extra_files),
    )
    if example.jit is not None:
        _write_torchscript(example.jit, model, inputs, jit_path(archive))
    return archive


def _write_torchscript(
    how: Literal["script", "trace"],
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    path: Path,
) -> None:
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream, but the references are the point here.
        warnings.filterwarnings("ignore", r"`torch\.jit\.", DeprecationWarning)
        # Raised by torch's own checker on nn.Module.__init__; not about our models.
        warnings.filterwarnings("ignore", "The TorchScript type system doesn't support")
        if how == "script":
            scripted = torch.jit.script(model)
        else:
            scripted = torch.jit.trace(model, inputs)
        torch.jit.save(scripted, str(path))
