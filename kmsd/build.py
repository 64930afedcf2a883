"""Which build of kmsd runs: the interpreted reference, or the optional one compiled with mypyc.

`KMSD_MYPYC=1 pip install --no-build-isolation .` (setup.py; mypy and setuptools >= 77 in the
environment) compiles MYPYC_MODULES, the hot path, into C extensions beside their sources;
everything else, and the plain `pip install .`, stays interpreted. The modules are the same
typed Python either way: the interpreted build is the reference, the tests run on both
(README.md), fuzzing runs on the interpreted one. setup.py reads this file on its own (it
imports only the standard library).

Modules left out, and why (mypyc 2.4): logs (method aliases made in one assignment),
protocol.crypto (a class defined under an `if`),
protocol.errors (kmsclient subclasses its exceptions in interpreted code), rules and config
(an import cycle through host that crashes a compiled import).
"""

from __future__ import annotations

import importlib.util
from importlib.machinery import EXTENSION_SUFFIXES

MYPYC_MODULES = (
    "kmsd.cache",
    "kmsd.commit",
    "kmsd.host",
    "kmsd.journal",
    "kmsd.limits",
    "kmsd.metrics",
    "kmsd.protocol.connection",
    "kmsd.protocol.constants",
    "kmsd.protocol.epid",
    "kmsd.protocol.kms",
    "kmsd.protocol.ndr",
    "kmsd.protocol.products",
    "kmsd.protocol.rpc",
    "kmsd.server",
    "kmsd.store",
)


def is_compiled(module: str) -> bool:
    """True when `module` would be imported from a C extension (without importing it)."""
    spec = importlib.util.find_spec(module)
    return spec is not None and (spec.origin or "").endswith(tuple(EXTENSION_SUFFIXES))


def build() -> str:
    """`mypyc` when the hot path is compiled, else `interpreted` (for --version and the log)."""
    return "mypyc" if is_compiled("kmsd.host") else "interpreted"
