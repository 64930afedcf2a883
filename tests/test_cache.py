"""The activation count rules of the seed (DESIGN.md), on an injected clock."""

from __future__ import annotations

import random
import uuid

from kmsd.cache import RECORD_LIFETIME, ClientTable, MemoryCounter

WINDOWS = uuid.UUID("55c92734-d682-4d71-983e-d6ec3f16059f")
OFFICE = uuid.UUID("0ff1ce15-a989-479d-af46-f275c6370663")
WIN, OFF = WINDOWS.bytes_le, OFFICE.bytes_le  # as requests send them
DAY = 24 * 3600.0


def new() -> bytes:
    """A client (or application) ID as a request sends it."""
    return uuid.uuid4().bytes_le


def clients(n: int) -> list[bytes]:
    return [new() for _ in range(n)]


def ids(table: ClientTable) -> list[bytes]:
    """The clients in a table, oldest first."""
    return [client for client, _ in table.snapshot().records]


def test_seed_example_counts_are_cumulative_across_editions() -> None:
    counter = MemoryCounter(known=frozenset({WINDOWS}))
    a, b, vm, server = clients(4)
    assert counter.record(WIN, a, 25, 0.0) == 1
    assert counter.record(WIN, b, 25, 1.0) == 2
    assert counter.record(WIN, vm, 25, 2.0) == 3
    assert counter.record(WIN, server, 5, 3.0) == 4  # a server edition: cumulative


def test_server_activates_at_five_client_at_twenty_five() -> None:
    table = ClientTable()
    counts = [table.record(c, 5, float(i)) for i, c in enumerate(clients(5))]
    assert counts == [1, 2, 3, 4, 5]  # the fifth server meets its threshold of 5
    counts = [table.record(c, 25, 10.0 + i) for i, c in enumerate(clients(20))]
    assert counts[-1] == 25  # the twentieth Windows client brings the table to 25


def test_renewal_does_not_grow_the_count_and_restarts_the_30_days() -> None:
    table = ClientTable()
    a, b = clients(2)
    assert table.record(a, 25, 0.0) == 1
    assert table.record(b, 25, 1.0) == 2
    assert table.record(a, 25, 20 * DAY) == 2  # renewal: same count
    # b expires 30 days after its only request; a's renewal keeps it.
    assert table.snapshot().count(1.0 + RECORD_LIFETIME) == 1
    assert table.snapshot().count(20 * DAY + RECORD_LIFETIME - 1) == 1
    assert table.snapshot().count(20 * DAY + RECORD_LIFETIME) == 0


def test_record_expires_after_exactly_30_days() -> None:
    table = ClientTable()
    a, b = clients(2)
    table.record(a, 25, 0.0)
    assert table.snapshot().count(RECORD_LIFETIME - 1) == 1
    assert table.record(b, 25, RECORD_LIFETIME) == 1  # a is gone, b counts alone


def test_capacity_is_ten_for_servers_then_fifty_and_never_shrinks() -> None:
    table = ClientTable()
    servers = clients(12)
    counts = [table.record(c, 5, float(i)) for i, c in enumerate(servers)]
    assert counts == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 10]
    assert table.capacity == 10
    assert ids(table)[0] == servers[2]  # the two oldest were dropped
    assert table.record(new(), 25, 20.0) == 11  # a Windows client: capacity 50
    assert table.capacity == 50
    for i, c in enumerate(clients(60)):
        table.record(c, 5, 30.0 + i)  # servers again: the table keeps 50
    assert table.capacity == 50
    assert table.snapshot().count(100.0) == 50


def test_fifty_first_client_evicts_the_oldest() -> None:
    table = ClientTable()
    first, *rest = clients(51)
    table.record(first, 25, 0.0)
    for i, c in enumerate(rest[:-1]):
        table.record(c, 25, 1.0 + i)
    assert table.snapshot().count(100.0) == 50 and first in table
    assert table.record(rest[-1], 25, 200.0) == 50
    assert first not in table


def test_applications_are_counted_apart() -> None:
    counter = MemoryCounter(known=frozenset({WINDOWS, OFFICE}))
    for i, c in enumerate(clients(3)):
        counter.record(WIN, c, 25, float(i))
    assert counter.record(OFF, new(), 5, 10.0) == 1


def test_unknown_applications_cannot_evict_known_tables() -> None:
    counter = MemoryCounter(known=frozenset({WINDOWS}), max_tables=4)
    counter.record(WIN, new(), 25, 0.0)
    for i in range(10):
        counter.record(new(), new(), 5, 1.0 + i)
    assert len(counter.snapshot()) == 5  # Windows plus the 4 most recent unknown applications
    assert counter.record(WIN, new(), 25, 20.0) == 2


def test_capacity_is_twice_the_highest_n_policy() -> None:
    table = ClientTable()
    table.record(new(), 1000, 0.0)
    assert table.capacity == 2000


def test_clock_jumps_back_and_forward() -> None:
    table = ClientTable()
    a, b, c, d = clients(4)
    assert table.record(a, 25, 10 * DAY) == 1
    assert table.record(b, 25, 10 * DAY + 1) == 2
    assert table.record(c, 25, 9 * DAY) == 3  # the clock went back a day: still counted
    assert ids(table) == [c, a, b]  # kept in time order
    assert table.record(a, 25, 9 * DAY + 5) == 3  # a renewal after the jump: no growth
    # 30 days after the earlier time: c and a (renewed at 9 days) expire, b does not.
    assert table.record(d, 25, 9 * DAY + 5 + RECORD_LIFETIME) == 2
    assert set(ids(table)) == {b, d}
    # Forward by more than 30 days: everything before expires at once; never negative.
    assert table.snapshot().count(1000 * DAY) == 0
    assert table.record(a, 25, 1000 * DAY) == 1


def test_eviction_after_a_backward_jump_drops_the_oldest_by_time() -> None:
    table = ClientTable(fixed_capacity=2)
    a, b, c = clients(3)
    table.record(a, 5, 100.0)
    table.record(b, 5, 50.0)  # clock went back
    dropped: list[bytes] = []
    table.record(c, 5, 120.0, dropped)
    assert dropped == [b] and ids(table) == [a, c]


def test_forget_and_reset_take_clients_out_and_start_capacity_afresh() -> None:
    counter = MemoryCounter(known=frozenset({WINDOWS, OFFICE}))
    a, b, c = clients(3)
    counter.record(WIN, a, 25, 0.0)
    counter.record(WIN, b, 25, 1.0)
    counter.record(OFF, a, 5, 2.0)
    counter.record(OFF, c, 5, 3.0)
    assert counter.forget(a) == [WIN, OFF]  # every table it was counted in
    assert counter.forget(a) == []
    assert counter.record(WIN, a, 25, 4.0) == 2  # counted again as a new client
    assert counter.reset(OFF) == 1
    office = counter.snapshot()[OFFICE]
    assert (office.records, office.capacity) == ((), 0)
    assert counter.snapshot()[WINDOWS].capacity == 50  # untouched
    assert counter.record(OFF, b, 5, 5.0) == 1
    assert counter.reset() == 3
    assert all(not t.records and not t.capacity for t in counter.snapshot().values())


def test_a_snapshot_is_a_copy() -> None:
    table = ClientTable(fixed_capacity=3)
    a, b = clients(2)
    table.record(a, 25, 0.0)
    view = table.snapshot()
    table.record(b, 25, 1.0)
    assert view.records == ((a, 0.0),) and view.capacity == 3
    table.clear()
    assert table.capacity == 3 and len(table) == 0  # a fixed capacity stays


class _Model:
    """The seed's rules written the plain way, keyed by UUID: the reference the tables,
    keyed by the bytes a request sends, must agree with."""

    def __init__(self) -> None:
        self.capacity = 0
        self.records: list[tuple[uuid.UUID, float]] = []  # oldest first

    def record(self, client: uuid.UUID, required: int, now: float) -> int:
        self.capacity = max(self.capacity, 2 * max(required, 1))
        kept = [(c, t) for c, t in self.records if t > now - RECORD_LIFETIME]
        if any(c == client for c, _ in kept):
            kept = [(c, t) for c, t in kept if c != client]
        else:
            kept = kept[max(len(kept) - self.capacity + 1, 0) :]
        kept.append((client, now))
        self.records = sorted(kept, key=lambda record: record[1])  # stable: ties keep order
        return len(self.records)


def test_counting_by_bytes_agrees_with_counting_by_uuid() -> None:
    """A fixed-seed run of renewals, new clients, two applications, N policies of 5 and 25,
    and a clock that mostly ticks but sometimes jumps back or past 30 days."""
    rng = random.Random(19)
    apps = [WINDOWS, OFFICE, uuid.UUID(int=rng.getrandbits(128))]
    pool = [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(120)]
    counter = MemoryCounter(known=frozenset({WINDOWS, OFFICE}))
    models = {app: _Model() for app in apps}
    now = 0.0
    for _ in range(5000):
        step = rng.random()
        if step < 0.02:
            now -= rng.uniform(0, 5 * DAY)  # the clock went back
        elif step < 0.03:
            now += RECORD_LIFETIME * rng.uniform(0.5, 1.5)
        else:
            now += rng.uniform(0, DAY / 10)
        app, client = rng.choice(apps), rng.choice(pool)
        required = rng.choice((5, 5, 25))
        expected = models[app].record(client, required, now)
        assert counter.record(app.bytes_le, client.bytes_le, required, now) == expected
    tables = counter.snapshot()
    for app, model in models.items():
        view = tables[app]
        assert view.capacity == model.capacity
        assert [(uuid.UUID(bytes_le=c), t) for c, t in view.records] == model.records
