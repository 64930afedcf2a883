"""Repeated warnings are rate-limited per kind and address, and counted in a summary line."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import structlog

from kmsd.loglimit import SUPPRESSED, LogLimiter, client_address
from tests.conftest import LOOPBACK, start_kmsd, stop_kmsd

TIMEOUT = 10.0


class Virtual:
    """A limiter in virtual time, and the lines it let through and the summaries it wrote."""

    def __init__(self, **limits: int) -> None:
        self.now = 0.0
        self.summaries: list[tuple[str, str, int, int]] = []
        self.limiter = LogLimiter(
            clock=lambda: self.now,
            report=lambda *summary: self.summaries.append(summary),
            **limits,
        )

    def log(self, method: str, event: str, client: str | None = None) -> bool:
        """Whether the line is written."""
        fields = {"event": event} if client is None else {"event": event, "client": client}
        try:
            self.limiter(None, method, fields)
        except structlog.DropEvent:
            return False
        return True


def test_client_address() -> None:
    assert client_address("127.0.0.2:5000") == "127.0.0.2"
    assert client_address("[::1]:5000") == "::1"
    assert client_address("?") == "?" and client_address(None) == ""


def test_one_address_is_limited_others_still_heard_and_the_rest_counted() -> None:
    v = Virtual(window=10, per_address=5, per_kind=50)
    written = [v.log("warning", "connection refused", "127.0.0.2:1000") for _ in range(100)]
    assert written == [True] * 5 + [False] * 95
    assert v.log("warning", "connection refused", "127.0.0.3:1000")  # another address
    assert v.log("warning", "bad input", "127.0.0.2:1001")  # another kind
    assert v.log("error", "connection refused", "127.0.0.2:1002")  # another level
    assert all(v.log("info", "activation", "127.0.0.2:1003") for _ in range(100))
    assert v.summaries == []
    v.now = 9.9
    assert not v.log("warning", "connection refused", "127.0.0.2:1000")
    v.now = 10.0  # the window has ended: the summary, and the address is heard again
    assert v.log("warning", "connection refused", "127.0.0.2:1000")
    assert v.summaries == [("warning", "connection refused", 96, 1)]


def test_many_addresses_are_limited_by_kind() -> None:
    v = Virtual(window=10, per_address=5, per_kind=50)
    written = sum(
        v.log("warning", "connection refused", f"127.0.{i // 250}.{i % 250}:9") for i in range(1000)
    )
    assert written == 50
    assert sum(v.log("warning", "store trouble") for _ in range(60)) == 50  # no address
    v.limiter.flush()
    assert sorted(v.summaries) == [
        ("warning", "connection refused", 950, 950),
        ("warning", "store trouble", 10, 0),
    ]
    v.limiter.flush()
    assert len(v.summaries) == 2  # each suppressed line is counted once


def test_the_summary_line_itself_is_never_limited() -> None:
    v = Virtual(window=10, per_address=1, per_kind=1)
    assert all(v.log("warning", SUPPRESSED) for _ in range(10))


async def test_summary_comes_when_the_window_ends_without_a_further_event() -> None:
    """In the daemon's loop the summary is due at the window's end: a timer writes it."""
    v = Virtual(window=10, per_address=1, per_kind=10)
    loop = asyncio.get_running_loop()
    v.now = loop.time()
    v.limiter.clock = loop.time  # the loop's own clock: its timer is what is checked
    assert v.log("warning", "bad input", "127.0.0.2:1")
    assert not v.log("warning", "bad input", "127.0.0.2:2")
    timer = v.limiter._timer
    assert timer is not None and timer.when() == pytest.approx(v.limiter.ends)
    timer._run()  # what the loop does at that time
    assert v.summaries == [("warning", "bad input", 1, 1)]


async def _refused(port: int) -> None:
    reader, writer = await asyncio.open_connection(LOOPBACK, port, local_addr=("127.0.0.2", 0))
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(1), TIMEOUT) == b""  # closed by kmsd
    writer.close()


@pytest.mark.system
async def test_a_flood_of_refused_connections_writes_a_few_lines_and_a_count() -> None:
    kmsd = start_kmsd("--allow", f"{LOOPBACK}/32")
    try:
        for _ in range(60):
            await _refused(kmsd.port)
    finally:
        assert stop_kmsd(kmsd) == 0
    written = [e for e in kmsd.log if e.get("event") == "connection refused"]
    summaries = [e for e in kmsd.log if e.get("event") == SUPPRESSED]
    assert 5 <= len(written) < 60
    assert all(s["similar"] == "connection refused" and s["addresses"] == 1 for s in summaries)
    assert len(written) + sum(int(str(s["suppressed"])) for s in summaries) == 60
