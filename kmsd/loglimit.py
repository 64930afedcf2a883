"""Repeated warnings and errors rate-limited, so that the log survives an attack.

A flood of refused connections or bad PDUs would otherwise write thousands of lines a second
and bury everything else (and fill the journal). Per time window, each kind of event (its
level and name) is written at most PER_ADDRESS times for one client address and PER_KIND
times in all; the rest are counted, and when the window ends one line says how many similar
events were not written. Information and debug lines (one per activation) are not limited.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

WINDOW = 10.0  # seconds
PER_ADDRESS = 5  # lines of one kind for one client address per window
PER_KIND = 50  # lines of one kind per window, all addresses together
LIMITED = frozenset({"warning", "error", "critical"})  # structlog's method names
SUPPRESSED = "similar events suppressed"
MAX_ADDRESSES = 10_000  # addresses counted per window; beyond it, only the kind's total counts


@dataclass
class _Kind:
    written: int = 0
    suppressed: int = 0
    addresses: set[str] = field(default_factory=set)  # those with suppressed lines


def client_address(client: object) -> str:
    """The address of a `client` field ("host:port", "[v6]:port"), or "" without one."""
    if not isinstance(client, str):
        return ""
    host = client.rpartition(":")[0] if client.count(":") == 1 or client[:1] == "[" else client
    return host.strip("[]")


class LogLimiter:
    """A structlog processor. `clock` (seconds) can be replaced, so that tests run in
    virtual time; `report(level, event, suppressed, addresses)` writes a summary line."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        report: Callable[[str, str, int, int], None] | None = None,
        window: float = WINDOW,
        per_address: int = PER_ADDRESS,
        per_kind: int = PER_KIND,
    ) -> None:
        self.clock = clock
        self.report = report or self._report
        self.window = window
        self.per_address = per_address
        self.per_kind = per_kind
        self.ends = 0.0  # when the current window ends
        self.kinds: dict[tuple[str, str], _Kind] = {}
        self.per: dict[tuple[str, str, str], int] = {}  # (level, event, address) -> written
        self._timer: asyncio.TimerHandle | None = None

    def __call__(
        self, _: object, method: str, event: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        if method not in LIMITED or event.get("event") == SUPPRESSED:
            return event
        now = self.clock()
        if now >= self.ends:
            self.flush()
            self.ends = now + self.window
        name = str(event.get("event"))
        kind = self.kinds.get((method, name))
        if kind is None:
            kind = self.kinds[(method, name)] = _Kind()
        address = client_address(event.get("client"))
        key = (method, name, address)
        written = self.per.get(key, 0)
        if kind.written < self.per_kind and (not address or written < self.per_address):
            kind.written += 1
            if address and len(self.per) < MAX_ADDRESSES:
                self.per[key] = written + 1
            return event
        kind.suppressed += 1
        if len(kind.addresses) < MAX_ADDRESSES:
            kind.addresses.add(address)
        self._flush_later()
        raise structlog.DropEvent

    def flush(self) -> None:
        """End the current window: one line for each kind that had events suppressed."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        kinds, self.kinds, self.per = self.kinds, {}, {}
        self.ends = 0.0
        for (level, name), kind in list(kinds.items()):
            if kind.suppressed:
                self.report(level, name, kind.suppressed, len(kind.addresses - {""}))

    def _flush_later(self) -> None:
        """The summary is due when the window ends, also when no later event comes."""
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the next event after the window, or the final flush, reports
        self._timer = loop.call_later(max(0.0, self.ends - self.clock()), self.flush)

    def _report(self, level: str, name: str, suppressed: int, addresses: int) -> None:
        structlog.get_logger("kmsd").warning(
            SUPPRESSED,
            similar=name,
            similar_level=level,
            suppressed=suppressed,
            addresses=addresses,
            window_seconds=self.window,
        )
