"""Command line: ``python -m multipy.examples --out DIR [--only NAME ...]``.

Writes the example archives and prints one line per archive written.

Example:
    $ python -m multipy.examples --out /tmp/ex --only simple
    simple: /tmp/ex/simple.pt (+ simple_jit.pt)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ._generate import EXAMPLES, generate, jit_path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m multipy.examples",
        description="Write the torch::deploy example models as torch.package archives.",
    )
    parser.add_argument("--out", required=True, help="directory to write <name>.pt into")
    parser.add_argument(
        "--only",
        nargs="+",
        action="extend",
        choices=sorted(EXAMPLES),
        metavar="NAME",
        help=f"examples to write (default: all of {', '.join(EXAMPLES)})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, write the archives, print ``name: path`` lines; return 0.

    Example:
        >>> main(["--out", "/tmp/ex", "--only", "identity"])    # doctest: +SKIP
        identity: /tmp/ex/identity.pt (+ identity_jit.pt)
        0
    """
    args = _parser().parse_args(argv)
    for name, archive in generate(args.out, args.only).items():
        reference = jit_path(archive)
        suffix = f" (+ {reference.name})" if EXAMPLES[name].has_jit else ""
        print(f"{name}: {archive}{suffix}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
