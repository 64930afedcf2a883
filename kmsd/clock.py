"""Clocks other than the system's, for tests and simulations.

FileClock (`--clock-file`): `kmsclient simulate` runs clients on a virtual clock and writes
that clock's Unix time into the file (replacing it in one rename) before each request, so a
real kmsd counts, expires records and checks request times on the same virtual clock.
VirtualClock (kmsd.testing) stands still unless a test moves it; ShiftedClock is real time
that the admin endpoint's /api/clock moves (kmsd as a test double, with its token).
"""

from __future__ import annotations

import contextlib
import math
import time
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


def span(*, days: float = 0, hours: float = 0, minutes: float = 0, seconds: float = 0) -> float:
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


class VirtualClock:
    """A clock that stands still but when moved (kmsd.testing: what a test sees does not
    depend on how long the test took)."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(
        self, *, days: float = 0, hours: float = 0, minutes: float = 0, seconds: float = 0
    ) -> float:
        """Move the clock forward (back, with negative values); returns the new time."""
        self.now += span(days=days, hours=hours, minutes=minutes, seconds=seconds)
        return self.now

    def set(self, unix: float) -> None:
        self.now = unix


class ShiftedClock:
    """Real time, moved by the admin endpoint (/api/clock) when its changes are enabled."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(
        self, *, days: float = 0, hours: float = 0, minutes: float = 0, seconds: float = 0
    ) -> float:
        self.offset += span(days=days, hours=hours, minutes=minutes, seconds=seconds)
        return self()

    def set(self, unix: float) -> None:
        self.offset = unix - time.time()
