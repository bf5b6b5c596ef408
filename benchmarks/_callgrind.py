"""Counting instructions inside a process that runs under callgrind
(``valgrind --tool=callgrind --instr-atstart=no ...``), for the ``count_*``
scripts of this directory: switch the count on and off around the part to
measure, and read what was counted so far.

>>> collect(True); run_the_part(); collect(False)     # doctest: +SKIP
>>> instructions()                                     # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import subprocess


def collect(on: bool) -> None:
    """Switch callgrind's count on or off in this process (``callgrind_control -i``)."""
    subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def instructions() -> int:
    """Instructions counted so far, all threads of this process together."""
    out = subprocess.run(["callgrind_control", "-e", str(os.getpid())], capture_output=True,
                         text=True, check=True).stdout
    return sum(int(m.replace(",", "")) for m in re.findall(r"^\s*Th\s+\d+\s+([\d,]+)", out, re.M))
