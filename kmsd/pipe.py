"""Command-line programs end quietly when the reader of their output goes away
(`kmsd clients | head -3`, `kmsclient load ... | head -1`)."""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import ParamSpec

P = ParamSpec("P")
SIGPIPE_EXIT = 128 + signal.SIGPIPE  # how a shell reports a program ended by SIGPIPE


def quiet_on_broken_pipe(main: Callable[P, int]) -> Callable[P, int]:
    """Python ignores SIGPIPE, so writing to a closed pipe raises BrokenPipeError: end
    with the status a shell expects instead of a traceback."""

    @functools.wraps(main)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except BrokenPipeError:
            # Flushing stdout at exit would fail again: let it write to /dev/null.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return SIGPIPE_EXIT

    return wrapper
