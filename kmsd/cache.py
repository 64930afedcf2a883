"""The activation count: client-ID tables with the rules of a real KMS host (DESIGN.md).

One table per KMS application, cumulative across client and server editions. A record
lives 30 days; a renewal replaces it; the table holds 2 x the highest threshold it has
seen and never shrinks; when full, the oldest record goes. Time is passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol
from uuid import UUID

RECORD_LIFETIME = 30 * 24 * 3600.0
MAX_REQUIRED_COUNT = 1000  # larger N policies are refused (PROTOCOL.md §5.2)
MAX_TABLES = 64  # tables of unknown applications kept at once; beyond it the stalest goes


class CountStore(Protocol):
    def record(self, application: UUID, client: UUID, required: int, now: float) -> int:
        """Record a request of `client`; returns the count to report to it."""
        ...


class ClientTable:
    """The client IDs of one application, oldest first."""

    __slots__ = ("capacity", "lifetime", "records")

    def __init__(self, lifetime: float = RECORD_LIFETIME, capacity: int = 0) -> None:
        self.lifetime = lifetime
        self.capacity = capacity
        self.records: OrderedDict[UUID, float] = OrderedDict()

    def expire(self, now: float) -> None:
        records = self.records
        cutoff = now - self.lifetime
        while records:
            oldest = next(iter(records))
            if records[oldest] > cutoff:
                break
            del records[oldest]

    def record(self, client: UUID, required: int, now: float) -> int:
        self.capacity = max(self.capacity, 2 * max(required, 1))
        self.expire(now)
        records = self.records
        if client in records:
            records.move_to_end(client)
        else:
            while len(records) >= self.capacity:
                records.popitem(last=False)
        records[client] = now
        return len(records)

    def count(self, now: float) -> int:
        self.expire(now)
        return len(self.records)


class MemoryCounter:
    """Client tables held in memory (the durable store stands behind the same interface)."""

    def __init__(
        self,
        known: frozenset[UUID] = frozenset(),
        lifetime: float = RECORD_LIFETIME,
        max_tables: int = MAX_TABLES,
    ) -> None:
        """`known` applications always keep their table; unknown ones (which anyone can
        invent) share `max_tables` slots, least recently used first out."""
        self.known = known
        self.lifetime = lifetime
        self.max_tables = max_tables
        self.tables: dict[UUID, ClientTable] = {}
        self._unknown: OrderedDict[UUID, None] = OrderedDict()

    def table(self, application: UUID) -> ClientTable:
        table = self.tables.get(application)
        if table is None:
            table = self.tables[application] = ClientTable(self.lifetime)
        if application not in self.known:
            self._unknown[application] = None
            self._unknown.move_to_end(application)
            if len(self._unknown) > self.max_tables:
                stale, _ = self._unknown.popitem(last=False)
                del self.tables[stale]
        return table

    def record(self, application: UUID, client: UUID, required: int, now: float) -> int:
        return self.table(application).record(client, required, now)
