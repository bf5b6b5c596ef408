"""``python -m multipy``: the same command line as the ``multipy`` script.

Example:
    $ python -m multipy info
"""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
