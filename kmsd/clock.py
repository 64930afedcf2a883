"""Time for kmsd from a file, for tests and simulations only (`--clock-file`).

`kmsclient simulate` runs clients on a virtual clock and writes that clock's Unix time
into the file (replacing it in one rename) before each request, so a real kmsd counts,
expires records and checks request times on the same virtual clock.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

from .files import read_small


class ClockFileError(OSError):
    """The clock file cannot be read or holds no Unix time."""


def read_clock(path: Path) -> float:
    """The Unix time in `path`: a finite number (NaN or infinity would stop every commit)."""
    try:
        value = float(read_small(path, 64).decode("ascii").strip())
    except OSError as exc:
        raise ClockFileError(f"clock file {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ClockFileError(f"clock file {path}: {exc}") from None
    if not math.isfinite(value) or value < 0:
        raise ClockFileError(f"clock file {path}: {value!r} is not a Unix time")
    return value


class FileClock:
    """A clock that reads `path` on every call; a read that fails keeps the last time
    read (the writer replaces the file atomically, so this is only a missing file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last = read_clock(path)  # raises at start-up when the file is unusable

    def __call__(self) -> float:
        with contextlib.suppress(ClockFileError):
            self.last = read_clock(self.path)
        return self.last
