"""Shared fixtures: a kmsd in this process, and kmsd as a real subprocess."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from kmsd.cache import MemoryCounter
from kmsd.host import HostIdentity, HostPolicy, KmsHost
from kmsd.protocol.products import products
from kmsd.server import KmsServer, ServerSettings

LOOPBACK = "127.0.0.1"


def make_host(policy: HostPolicy = HostPolicy()) -> KmsHost:
    db = products()
    counter = MemoryCounter(known=frozenset(db.applications))
    return KmsHost(counter, HostIdentity(hwid=bytes.fromhex("0123456789abcdef")), policy)


@pytest.fixture
async def server() -> AsyncIterator[KmsServer]:
    """kmsd serving on an ephemeral loopback port inside the test's event loop."""
    srv = KmsServer(make_host(), ServerSettings(listen=((LOOPBACK, 0),)))
    await srv.start()
    yield srv
    await srv.stop()


@dataclass
class KmsdProcess:
    process: subprocess.Popen[str]
    host: str
    port: int
    log: list[dict[str, object]]

    def read_log_until(self, event: str, timeout: float = 10.0) -> dict[str, object]:
        """Read the daemon's JSON log until a line with this event arrives."""
        assert self.process.stderr is not None
        deadline = time.monotonic() + timeout
        sel = selectors.DefaultSelector()
        sel.register(self.process.stderr, selectors.EVENT_READ)
        try:
            while (left := deadline - time.monotonic()) > 0:
                if not sel.select(left):
                    break
                line = self.process.stderr.readline()
                if not line:
                    break
                entry = json.loads(line)
                self.log.append(entry)
                if entry.get("event") == event:
                    return entry
        finally:
            sel.close()
        raise AssertionError(f"kmsd logged no {event!r} within {timeout} s: {self.log}")


def start_kmsd(*args: str, listen: str = f"{LOOPBACK}:0") -> KmsdProcess:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kmsd", "--listen", listen, "--log-format", "json", *args],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    kmsd = KmsdProcess(proc, LOOPBACK, 0, [])
    address = str(kmsd.read_log_until("listening")["address"])
    host, _, port = address.rpartition(":")
    kmsd.host, kmsd.port = host.strip("[]"), int(port)
    kmsd.read_log_until("kmsd ready")
    return kmsd


def stop_kmsd(kmsd: KmsdProcess) -> int:
    if kmsd.process.poll() is None:
        kmsd.process.send_signal(signal.SIGTERM)
    try:
        return kmsd.process.wait(timeout=10)
    finally:
        if kmsd.process.stderr:
            kmsd.process.stderr.close()


@pytest.fixture
def kmsd_process() -> Iterator[KmsdProcess]:
    """kmsd as a subprocess on an ephemeral loopback port, JSON logs readable."""
    kmsd = start_kmsd()
    yield kmsd
    stop_kmsd(kmsd)
