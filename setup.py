"""Build hook for the optional C extension ``multipy._native``.

Everything else about the package lives in pyproject.toml.  The extension is
``optional``: without a working C compiler the install still succeeds and
multipy runs on its pure-Python transport (``multipy info`` says which one is
active and why).
"""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):  # futex and memfd are Linux interfaces
    ext_modules.append(Extension(
        "multipy._native",
        sources=["src/multipy/_native.c"],
        extra_compile_args=["-O2", "-std=gnu11"],
        optional=True,
    ))

setup(ext_modules=ext_modules)
