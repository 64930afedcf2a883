"""The activation count: client-ID tables with the rules of a real KMS host (DESIGN.md).

One table per KMS application, cumulative across client and server editions. A record
lives 30 days; a renewal replaces it; the table holds 2 x the highest threshold it has
seen and never shrinks; when full, the oldest record goes. Time is passed in.

Applications and clients are GUIDs as a request sends them (16 bytes, wire order): a
lookup hashes bytes, whose hash Python keeps, where a UUID's runs Python code each time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from uuid import UUID

if TYPE_CHECKING:
    from .protocol.kms import BaseRequest

RECORD_LIFETIME = 30 * 24 * 3600.0
MAX_REQUIRED_COUNT = 1000  # larger N policies are refused (docs/protocol.md, Counting)
MAX_TABLES = 64  # tables of unknown applications kept at once; beyond it the stalest goes


class CountStore(Protocol):
    """Where the host counts its clients."""

    def count(self, request: BaseRequest, now: float, address: str) -> int:
        """Record this request; returns the number of clients to report to it."""
        ...


@dataclass(frozen=True, slots=True)
class TableView:
    """A copy of one table at one moment: its capacity and its records (client ID as
    sent, time recorded), oldest first."""

    capacity: int
    records: tuple[tuple[bytes, float], ...]
    lifetime: float

    def count(self, now: float) -> int:
        """Clients counted at `now` (expired records no longer count)."""
        cutoff = now - self.lifetime
        return sum(1 for _, t in self.records if t > cutoff)


class ClientTable:
    """The client IDs of one application, oldest first.

    `fixed_capacity` replaces the 2 x N rule for experiments.
    """

    __slots__ = ("_capacity", "_records", "fixed_capacity", "lifetime")

    def __init__(
        self,
        lifetime: float = RECORD_LIFETIME,
        capacity: int = 0,
        fixed_capacity: int | None = None,
    ) -> None:
        self.lifetime = lifetime
        self.fixed_capacity = fixed_capacity
        self._capacity = fixed_capacity or capacity
        self._records: OrderedDict[bytes, float] = OrderedDict()

    @property
    def capacity(self) -> int:
        """2 x the highest threshold seen (or the fixed capacity); never shrinks."""
        return self._capacity

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, client: object) -> bool:
        return client in self._records

    def snapshot(self) -> TableView:
        return TableView(self._capacity, tuple(self._records.items()), self.lifetime)

    def restore(self, capacity: int, records: Iterable[tuple[bytes, float]]) -> None:
        """Load what a store kept (records in any order)."""
        self._capacity = self.fixed_capacity or capacity
        self._records.update(records)
        self.sort()

    def forget(self, client: bytes) -> bool:
        """Take one client out of the table; False if it was not in it."""
        return self._records.pop(client, None) is not None

    def clear(self) -> int:
        """Start afresh: no records, the capacity back to its start. Returns the records
        removed."""
        removed = len(self._records)
        self._records.clear()
        self._capacity = self.fixed_capacity or 0
        return removed

    def expire(self, now: float, dropped: list[bytes] | None = None) -> None:
        records = self._records
        cutoff = now - self.lifetime
        while records:
            oldest = next(iter(records))
            if records[oldest] > cutoff:
                break
            del records[oldest]
            if dropped is not None:
                dropped.append(oldest)

    def record(
        self, client: bytes, required: int, now: float, dropped: list[bytes] | None = None
    ) -> int:
        """Record a request; returns the count. Records that leave go into `dropped`."""
        if self.fixed_capacity is None:
            wanted = 2 * required if required > 1 else 2
            if wanted > self._capacity:
                self._capacity = wanted
        records = self._records
        if records and next(iter(records.values())) <= now - self.lifetime:
            self.expire(now, dropped)  # only when the oldest record has expired
        # Records stay in time order, so that expiry and eviction look at the oldest first;
        # only a clock that went back breaks the order, and then the table is sorted again.
        went_back = bool(records) and now < next(reversed(records.values()))
        if client in records:
            records.move_to_end(client)
        else:
            while len(records) >= self._capacity:
                oldest, _ = records.popitem(last=False)
                if dropped is not None:
                    dropped.append(oldest)
        records[client] = now
        if went_back:
            self.sort()
        return len(records)

    def sort(self) -> None:
        """Order the records by time (needed only after the clock went backwards)."""
        ordered = sorted(self._records.items(), key=lambda item: item[1])
        self._records.clear()
        self._records.update(ordered)


class MemoryCounter:
    """Client tables held in memory (the durable store keeps one as its working copy)."""

    def __init__(
        self,
        known: frozenset[UUID] = frozenset(),
        lifetime: float = RECORD_LIFETIME,
        max_tables: int = MAX_TABLES,
        fixed_capacity: int | None = None,
    ) -> None:
        """`known` applications always keep their table; unknown ones (which anyone can
        invent) share `max_tables` slots, least recently used first out."""
        self.known = frozenset(app.bytes_le for app in known)
        self.lifetime = lifetime
        self.max_tables = max_tables
        self.fixed_capacity = fixed_capacity
        self._tables: dict[bytes, ClientTable] = {}
        self._unknown: OrderedDict[bytes, None] = OrderedDict()

    def table(self, application: bytes, dropped_tables: list[bytes] | None = None) -> ClientTable:
        """The table of an application, made when first asked for; an unknown application
        beyond `max_tables` pushes the stalest one out (into `dropped_tables`)."""
        table = self._tables.get(application)
        if table is None:
            table = self._tables[application] = ClientTable(
                self.lifetime, fixed_capacity=self.fixed_capacity
            )
        if application not in self.known:
            self._unknown[application] = None
            self._unknown.move_to_end(application)
            if len(self._unknown) > self.max_tables:
                stale, _ = self._unknown.popitem(last=False)
                del self._tables[stale]
                if dropped_tables is not None:
                    dropped_tables.append(stale)
        return table

    def snapshot(self) -> dict[UUID, TableView]:
        """A copy of every table, by application (as a UUID: for readers, who look it up
        in the product database)."""
        return {UUID(bytes_le=app): table.snapshot() for app, table in self._tables.items()}

    def forget(self, client: bytes) -> list[bytes]:
        """Take one client out of every table; returns the applications it was counted in."""
        return [app for app, table in self._tables.items() if table.forget(client)]

    def reset(self, application: bytes | None = None) -> int:
        """Empty the table of one application (None: of all) and start its capacity
        afresh; returns the records removed."""
        if application is None:
            return sum(table.clear() for table in self._tables.values())
        table = self._tables.get(application)
        return table.clear() if table is not None else 0

    def record(
        self,
        application: bytes,
        client: bytes,
        required: int,
        now: float,
        dropped: list[bytes] | None = None,
    ) -> int:
        return self.table(application).record(client, required, now, dropped)

    def count(self, request: BaseRequest, now: float, address: str) -> int:
        return self.record(
            request.application_id, request.client_machine_id, request.required_count, now
        )
