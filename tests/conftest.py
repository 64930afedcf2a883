"""Shared fixtures: a kmsd in this process, and kmsd as a real subprocess."""

from __future__ import annotations

import functools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hypothesis
import pytest

from kmsd.cache import MemoryCounter
from kmsd.config import defaults
from kmsd.host import HostIdentity, HostPolicy, KmsHost
from kmsd.protocol.products import Sku, products
from kmsd.server import KmsServer, ServerSettings
from kmsd.store import StoreSettings

if TYPE_CHECKING:
    from kmsd.dns.publish import PublishSettings

LOOPBACK = "127.0.0.1"

# Property tests draw the same cases at every run (a seed derived from each test): a failure
# is found again by anyone, and a run cannot fail one time in a hundred. The cases a test
# needs beyond those are written as @example.
hypothesis.settings.register_profile("kmsd", derandomize=True, database=None)
hypothesis.settings.load_profile("kmsd")

# The README's test command runs `.venv/bin/python -m pytest` without activating the venv:
# programs the tests start (kmsd, kmsclient, example tools) must find this venv's commands.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

# Two tiers. `system`: tests that start daemons, real servers or other programs (kmsd as a
# process or on a socket, BIND, Samba, chromium, tshark, systemd-analyze, ruff, mypy); the
# rest is the pure core, run in seconds by `pytest -m "not system"`. Whole modules of
# system tests are listed here; so is any test using the `server` fixture or one of kmsd's
# pytest plugin (kms_host, kms_hosts, kms_dns); other system
# tests carry @pytest.mark.system. A test of the pure core that opens a socket or starts
# a process fails (see _pure_core_stays_pure), so a missing mark cannot go unnoticed.
SYSTEM_MODULES = frozenset(
    {
        "test_admin_http",
        "test_bench",
        "test_commands",
        "test_control",
        "test_deploy",
        "test_dns_bind",
        "test_dns_gss",
        "test_dns_samba",
        "test_double",
        "test_example_tool",
        "test_faults",
        "test_fuzz",
        "test_impacket",
        "test_inert",
        "test_logs",
        "test_pipe",
        "test_plugin",
        "test_pristine_debian",
        "test_readme_commands",
        "test_reload",
        "test_server",
        "test_store",
        "test_style",
        "test_systemd",
        "test_tshark",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The pristine Debian check runs in the background from the start (pytest_collection_
    # finish); its test, which waits for it, goes last so that every other test overlaps it.
    items.sort(key=lambda item: item.name == "test_readme_setup_on_pristine_debian")
    for item in items:
        module = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
        fixtures = set(getattr(item, "fixturenames", ()))
        if module in SYSTEM_MODULES or fixtures & {"server", "kms_host", "kms_hosts", "kms_dns"}:
            item.add_marker(pytest.mark.system)


def _not_in_the_pure_core(original: Callable[..., Any]) -> Callable[..., Any]:
    """`original`, refused in the thread running a test of the pure core. Other threads (the
    pristine Debian check runs beside the whole suite in its own) keep the real thing."""
    test_thread = threading.current_thread()

    @functools.wraps(original)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is test_thread:
            raise AssertionError("a socket or a process in a test of the pure core: mark it system")
        return original(*args, **kwargs)

    return guarded


@pytest.fixture(autouse=True)
def _pure_core_stays_pure(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("system") is not None:
        return
    for owner, name in (
        (socket.socket, "bind"),
        (socket.socket, "connect"),
        (socket.socket, "connect_ex"),
        (subprocess.Popen, "_execute_child"),
    ):
        monkeypatch.setattr(owner, name, _not_in_the_pure_core(getattr(owner, name)))


def server_settings(**changes: Any) -> ServerSettings:
    """kmsd's default network settings, listening on an ephemeral loopback port."""
    return replace(defaults().network, **{"listen": ((LOOPBACK, 0),), **changes})


def publish_settings(zone: str = "lab.test", **changes: Any) -> PublishSettings:
    """kmsd's default publication settings for `zone`, with the target kms1.<zone>."""
    (settings,) = defaults(publish_zone=zone, publish_host=f"kms1.{zone}").dns
    return replace(settings, **changes)


def table_settings(path: str | Path, **changes: Any) -> StoreSettings:
    """kmsd's default table settings, with the database at `path`."""
    return replace(defaults().table, path=str(path), **changes)


def sku(name: str) -> Sku:
    """A product the database must have, by name."""
    found = products().sku_by_name(name)
    assert found is not None, name
    return found


def make_host(policy: HostPolicy = HostPolicy()) -> KmsHost:
    db = products()
    counter = MemoryCounter(known=frozenset(db.applications))
    identity = HostIdentity(hwid=bytes.fromhex("0123456789abcdef"))
    identity.complete(db, os.urandom, time.time())
    return KmsHost(counter, identity, policy)


@pytest.fixture
async def server() -> AsyncIterator[KmsServer]:
    """kmsd serving on an ephemeral loopback port inside the test's event loop."""
    srv = KmsServer(make_host(), server_settings())
    await srv.start()
    yield srv
    await srv.stop()


@dataclass
class KmsdProcess:
    process: subprocess.Popen[bytes]
    host: str
    port: int
    log: list[dict[str, object]] = field(default_factory=list)
    _pending: bytes = b""
    _read: int = 0  # entries of `log` already returned by read_log_until

    def _take_lines(self, chunk: bytes) -> None:
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        self.log.extend(json.loads(line) for line in lines if line.strip())

    def read_log_until(self, event: str, timeout: float = 10.0) -> dict[str, object]:
        """The next JSON log entry with this event, reading the daemon's stderr as needed."""
        assert self.process.stderr is not None
        fd = self.process.stderr.fileno()
        deadline = time.monotonic() + timeout
        while True:
            for i in range(self._read, len(self.log)):
                if self.log[i].get("event") == event:
                    self._read = i + 1
                    return self.log[i]
            self._read = len(self.log)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self._take_lines(chunk)
        raise AssertionError(f"kmsd logged no {event!r} within {timeout} s: {self.log}")

    def drain(self) -> None:
        """Read the rest of the log once the process has exited."""
        if self.process.stderr is not None and not self.process.stderr.closed:
            self._take_lines(self.process.stderr.read() + b"\n")
            self.process.stderr.close()


def run_kmsd(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The kmsd command run to completion (admin commands, argument errors, check-config)."""
    return subprocess.run(
        [sys.executable, "-m", "kmsd", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        input=stdin,
        env=env,
    )


def start_kmsd(
    *args: str,
    listen: str = f"{LOOPBACK}:0",
    db: str | None = ":memory:",
    env: dict[str, str] | None = None,
) -> KmsdProcess:
    """kmsd as a subprocess; db=None: no --db (the environment or a file names it); `env`:
    variables added to this process's environment."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kmsd",
            "--listen",
            listen,
            "--log-format",
            "json",
            *(("--db", db) if db is not None else ()),
            *args,
        ],
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    kmsd = KmsdProcess(proc, LOOPBACK, 0)
    address = str(kmsd.read_log_until("listening")["address"])
    host, _, port = address.rpartition(":")
    kmsd.host, kmsd.port = host.strip("[]"), int(port)
    kmsd.read_log_until("kmsd ready")
    return kmsd


def stop_kmsd(kmsd: KmsdProcess) -> int:
    """SIGTERM, wait, and collect the rest of the log; returns the exit status."""
    if kmsd.process.poll() is None:
        kmsd.process.send_signal(signal.SIGTERM)
    try:
        return kmsd.process.wait(timeout=10)
    finally:
        kmsd.drain()


@pytest.fixture
def kmsd_process() -> Iterator[KmsdProcess]:
    """kmsd as a subprocess on an ephemeral loopback port, JSON logs readable."""
    kmsd = start_kmsd()
    yield kmsd
    stop_kmsd(kmsd)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the minutes-long pristine Debian check now, to run beside the other tests."""
    if any(item.name == "test_readme_setup_on_pristine_debian" for item in session.items):
        from tests.test_pristine_debian import start_in_background

        start_in_background()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The time each README command took on the pristine Debian root, when that check ran."""
    from tests.test_pristine_debian import TIMINGS

    if TIMINGS:
        terminalreporter.section("README commands on a pristine Debian 12")
        for label, seconds in TIMINGS:
            terminalreporter.write_line(f"{seconds:8.1f} s  {label}")


def read_until(fd: int, pattern: str, deadline: float) -> str:
    """What `fd` gave until `pattern` appeared or the deadline (time.monotonic()) passed; read
    unbuffered, so that select sees everything that arrived."""
    seen = b""
    while pattern.encode() not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 65536) if ready else b""
        if not chunk:
            break
        seen += chunk
    return seen.decode(errors="replace")


def free_tcp_port() -> int:
    """A TCP port free on 127.0.0.1 now (for programs that must be told a port up front)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port
