"""Small files an operator names (configuration, keys, the clock file), read safely: regular
files only, never more than a cap, and never waiting (a FIFO or a device is refused, not
opened for a read that could block the event loop)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

MAX_SIZE = 1 << 20  # bytes; the files kmsd reads are a few kilobytes


def read_small(path: Path, limit: int = MAX_SIZE) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; OSError (its strerror says
    why) for anything else."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file")
        data = b""
        while len(data) <= limit:
            chunk = os.read(fd, limit + 1 - len(data))
            if not chunk:
                return data
            data += chunk
        raise OSError(errno.EFBIG, f"larger than {limit} bytes")
    finally:
        os.close(fd)


def read_text(path: Path, limit: int = MAX_SIZE) -> str:
    """read_small, decoded as UTF-8 (UnicodeDecodeError when it is not)."""
    return read_small(path, limit).decode("utf-8")
