"""Which event loop runs a program: uvloop when asked to ("auto": when it is installed;
it takes about a fifth less CPU per exchange), else asyncio's own."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
CHOICES = ("auto", "uvloop", "asyncio")


def uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def run_on_loop(main: Coroutine[Any, Any, T], loop: str = "auto") -> T:
    """Run `main` to completion on the loop `loop` names (one of CHOICES); callers check
    first that uvloop is installed when it is asked for by name."""
    if loop != "asyncio" and uvloop_installed():
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
