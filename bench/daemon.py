"""A kmsd for a benchmark: on a free loopback port, with its database and (unless told
otherwise) its log, kmsd.log, in a temporary directory, stopped (SIGTERM) when the block
ends. kmsd runs in its default configuration (info log) unless the arguments say otherwise."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Daemon:
    port: int
    db: str
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def running_kmsd(*args: str, startup: float = 15.0, stderr: int | None = None) -> Iterator[Daemon]:
    """`stderr`: where kmsd's log goes (a file descriptor; default: kmsd.log beside the
    database, as a file, the way an installed kmsd logs to the journal or a file)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        db = f"{tmp}/kmsd.db"
        log = open(f"{tmp}/kmsd.log", "wb")  # noqa: SIM115 - closed below
        process = subprocess.Popen(
            [sys.executable, "-m", "kmsd", "--listen", f"127.0.0.1:{port}", "--db", db, *args],
            cwd=ROOT,
            stderr=log if stderr is None else stderr,
        )
        try:
            deadline = time.monotonic() + startup
            while time.monotonic() < deadline and process.poll() is None:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                time.sleep(0.05)  # polling a port a benchmark waits for, bounded above
            yield Daemon(port, db, process)
        finally:
            process.terminate()
            process.wait(timeout=30)
            log.close()
