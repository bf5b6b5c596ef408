"""The torch::deploy example models, written as ``torch.package`` archives.

:func:`generate` writes ``<out>/<name>.pt`` for every entry of
:data:`EXAMPLES` (plus a TorchScript reference ``<name>_jit.pt`` where one
exists); the model classes live in :mod:`multipy.examples.models` and are
interned into each archive, so archives load without ``multipy`` installed.

Example:
    >>> from multipy.examples import generate
    >>> sorted(generate("/tmp/examples", ["simple", "identity"]))
    ['identity', 'simple']

From the shell: ``python -m multipy.examples --out DIR [--only NAME ...]``.
"""

from ._generate import EXAMPLES, Example, generate, jit_path

__all__ = ["EXAMPLES", "Example", "generate", "jit_path"]
