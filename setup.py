"""Only the optional compiled accelerators live here; all metadata is in pyproject.toml.

The C Rijndael: `optional=True`, so when it cannot be built (no compiler, no Python headers)
the install still succeeds and kmsd.protocol.crypto falls back to pure Python.

The hot path compiled with mypyc, only when KMSD_MYPYC=1 (kmsd/build.py lists the modules and
says why the others are not; README.md, "The compiled build"). It needs mypy in the build
environment, hence `pip install --no-build-isolation` into an environment that has mypy and
setuptools >= 77; a module that does not compile fails the install, loudly.
"""

import os
import runpy
from pathlib import Path

from setuptools import Extension, setup

ext_modules = [
    Extension(
        "kmsd.protocol._rijndael",
        sources=["kmsd/protocol/_rijndael.c"],
        optional=True,
    )
]

if os.environ.get("KMSD_MYPYC", "") not in ("", "0"):
    from mypyc.build import mypycify

    here = Path(__file__).resolve().parent
    modules = runpy.run_path(str(here / "kmsd" / "build.py"))["MYPYC_MODULES"]
    ext_modules += mypycify(
        [str(Path(*name.split(".")).with_suffix(".py")) for name in modules],
        opt_level="3",
        debug_level="0",
        group_name="kmsd",
    )

setup(ext_modules=ext_modules)
