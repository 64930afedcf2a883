"""The durable store: group commit, restart, crash, schema, admin commands, lab overrides."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kmsclient.session import KmsConnection
from kmsd import tablecmd
from kmsd.cache import TableView
from kmsd.commit import Commit
from kmsd.host import HostPolicy
from kmsd.protocol.client import base_request
from kmsd.protocol.kms import BaseRequest, encode_request, guid_text
from kmsd.protocol.products import products
from kmsd.store import (
    MEMORY,
    MEMORY_HISTORY,
    MIGRATIONS,
    SCHEMA_VERSION,
    SqliteStore,
    StoreError,
)
from tests.conftest import (
    KmsdProcess,
    make_host,
    run_kmsd,
    start_kmsd,
    stop_kmsd,
    table_settings,
)

DB = products()
WIN = DB.sku_by_name("Windows 10/11 Enterprise")
SERVER = DB.sku_by_name("Windows Server 2022 Standard")
KNOWN = frozenset(DB.applications)
DAY = 86400.0
NOW = 1_795_000_000.0


def request(sku_name: str = "Windows 10/11 Enterprise", **kw: object) -> BaseRequest:
    sku = DB.sku_by_name(sku_name)
    assert sku is not None
    return base_request(sku, now=NOW, **kw)  # type: ignore[arg-type]


def table_of(store: SqliteStore, application: bytes) -> TableView:
    """The table of an application, by its ID as requests send it."""
    return store.counter.snapshot()[UUID(bytes_le=application)]


def ids(table: TableView) -> list[bytes]:
    """The clients in a table (IDs as sent), oldest first."""
    return [client for client, _ in table.records]


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


async def test_reply_waits_for_commit_and_commits_come_in_groups(tmp_path: Path) -> None:
    path = tmp_path / "kmsd.db"
    store = SqliteStore(table_settings(path), known=KNOWN)
    store.start(asyncio.get_running_loop())
    clients = [request() for _ in range(20)]
    counts = [store.count(r, NOW + i, "127.0.0.1:1") for i, r in enumerate(clients)]
    barrier = store.barrier()
    assert counts == list(range(1, 21))
    await asyncio.wait_for(barrier, 10)
    # Everything counted before the barrier is on disk, seen by another connection.
    # The database keeps the GUIDs' text, as before the host counted by bytes.
    stored = {r[0] for r in rows(path, "SELECT client FROM records")}
    assert stored == {str(UUID(bytes_le=r.client_machine_id)) for r in clients}
    application = str(UUID(bytes_le=clients[0].application_id))
    assert rows(path, "SELECT application FROM apps") == [(application,)]
    assert rows(path, "SELECT capacity FROM apps") == [(50,)]
    history = rows(path, "SELECT workstation, protocol, address, requests FROM clients LIMIT 1")
    assert history == [("kmsclient.lab.test", "6.0", "127.0.0.1:1", 1)]
    await store.close()


async def test_restart_keeps_counts_capacity_order_and_identity(tmp_path: Path) -> None:
    path = str(tmp_path / "kmsd.db")
    store = SqliteStore(table_settings(path), known=KNOWN)
    store.start(asyncio.get_running_loop())
    first = request()
    for i, r in enumerate([first, *(request("Windows Server 2022 Standard") for _ in range(3))]):
        store.count(r, NOW + i, "a")
    store.save_identity(
        b"\x01" * 8, {"windows": "03612-00206-556-123727-03-1033-17763.0000-2972018"}
    )
    await store.barrier()
    await store.close()

    again = SqliteStore(table_settings(path), known=KNOWN)
    assert again.load_identity() == (
        b"\x01" * 8,
        {"windows": "03612-00206-556-123727-03-1033-17763.0000-2972018"},
    )
    table = table_of(again, first.application_id)
    assert table.capacity == 50 and ids(table)[0] == first.client_machine_id
    again.start(asyncio.get_running_loop())
    assert again.count(first, NOW + 10, "a") == 4  # a renewal: no growth
    assert again.count(request(), NOW + 11, "a") == 5
    # 30 days after the first requests only the renewed client and the newest remain.
    assert again.count(request(), NOW + 30 * DAY + 5, "a") == 3
    await again.barrier()
    await again.close()
    assert len(rows(Path(path), "SELECT client FROM records")) == 3


@pytest.mark.parametrize("old", [1, 2])
async def test_an_older_database_is_migrated_with_its_records(tmp_path: Path, old: int) -> None:
    path = tmp_path / "kmsd.db"
    assert WIN is not None
    app, client = str(WIN.kms.application.id), "5e1f5c6e-4b1c-4f1e-9d55-0123456789ab"
    with sqlite3.connect(path) as db:  # what an older kmsd left behind
        for step in range(1, old + 1):
            db.executescript(MIGRATIONS[step])
        db.execute(f"PRAGMA user_version={old}")
        db.execute(
            "INSERT INTO clients VALUES (?, ?, 'ws', 's', 'k', '6.0', 25, 0, 2, 'a', ?, ?, 3, ?,"
            " ?)",
            (app, client, NOW, NOW, NOW, 7),
        )
        db.execute("INSERT INTO apps VALUES (?, 50)", (app,))
    store = SqliteStore(table_settings(path), known=KNOWN)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    assert rows(path, "SELECT capacity, low_seq FROM apps") == [(50, 0)]
    assert rows(path, "SELECT name FROM sqlite_master WHERE type = 'index' AND sql NOT NULL") == []
    table = table_of(store, WIN.kms.application.id.bytes_le)
    assert (ids(table), table.capacity) == ([UUID(client).bytes_le], 50)
    store.start(asyncio.get_running_loop())
    assert store.count(request(), NOW + 1, "b") == 2
    await store.barrier()
    await store.close()
    assert rows(path, "SELECT count(*) FROM records") == [(2,)]


def test_second_daemon_on_the_same_file_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "kmsd.db")
    first = SqliteStore(table_settings(path))
    with pytest.raises(StoreError, match="another kmsd is serving from this database"):
        SqliteStore(table_settings(path))
    first.db.close()
    first._release_lock()
    SqliteStore(table_settings(path))  # free again once the first one let go


def test_newer_schema_corrupt_file_and_foreign_database_are_refused(tmp_path: Path) -> None:
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="written by a newer kmsd"):
        SqliteStore(table_settings(newer))
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not SQLite at all" * 100)
    with pytest.raises(StoreError, match="not a kmsd database, or corrupt"):
        SqliteStore(table_settings(corrupt))
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE invoices (id INTEGER)")
    with pytest.raises(StoreError, match="not a kmsd database"):
        SqliteStore(table_settings(foreign))


async def test_commit_failure_holds_replies_back_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "kmsd.db"
    store = SqliteStore(table_settings(path), known=KNOWN)
    store.start(asyncio.get_running_loop())
    blocker = sqlite3.connect(path, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")  # nobody else can write now
    lost = request()
    store.count(lost, NOW, "a")
    with pytest.raises(StoreError, match="commit failed"):
        await asyncio.wait_for(store.barrier(), 10)
    blocker.rollback()
    blocker.close()
    later = request()
    store.count(later, NOW + 1, "a")
    await asyncio.wait_for(store.barrier(), 10)  # the retried batch and the new one commit
    stored = {r[0] for r in rows(path, "SELECT client FROM records")}
    assert stored == {lost.cmid_text, later.cmid_text}
    assert store.failures >= 1
    await store.close()


def test_lab_overrides_fixed_count_and_precharge() -> None:
    assert WIN
    fixed = make_host(HostPolicy(fixed_count=25))
    pre = make_host(HostPolicy(precharge=24))
    for host, expected in ((fixed, 25), (pre, 25)):
        _, activation = host.answer(encode_request(base_request(WIN), iv=os.urandom(16)), NOW)
        assert activation.count == expected


async def activate(host: str, port: int, sku_name: str, **kw: object) -> int:
    sku = DB.sku_by_name(sku_name)
    assert sku is not None
    conn = await KmsConnection.open(host, port)
    try:
        reply = await asyncio.wait_for(conn.activate(base_request(sku, **kw)), 10)  # type: ignore[arg-type]
    finally:
        await conn.close()
    return reply.base.count


async def test_daemon_restart_same_counts_epids_and_hwid(tmp_path: Path) -> None:
    path = str(tmp_path / "kmsd.db")
    kmsd = start_kmsd(db=path)
    counts = [
        await activate(kmsd.host, kmsd.port, "Windows 10/11 Enterprise", major=6) for _ in range(3)
    ]
    conn = await KmsConnection.open(kmsd.host, kmsd.port)
    assert WIN
    before = await conn.activate(base_request(WIN, major=6))
    await conn.close()
    assert stop_kmsd(kmsd) == 0
    kmsd = start_kmsd(db=path)
    try:
        conn = await KmsConnection.open(kmsd.host, kmsd.port)
        after = await conn.activate(base_request(WIN, major=6))
        await conn.close()
    finally:
        stop_kmsd(kmsd)
    assert counts == [1, 2, 3] and before.base.count == 4 and after.base.count == 5
    assert after.base.epid == before.base.epid and after.hwid == before.hwid


async def test_kill_9_during_load_loses_no_acknowledged_client(tmp_path: Path) -> None:
    path = str(tmp_path / "kmsd.db")
    kmsd = start_kmsd("--capacity", "100000", db=path)
    acknowledged: list[str] = []
    killed = asyncio.Event()
    assert SERVER

    async def client() -> None:
        while not killed.is_set() and len(acknowledged) < 2000:
            try:
                conn = await KmsConnection.open(kmsd.host, kmsd.port)
                base = base_request(SERVER, major=5)
                await asyncio.wait_for(conn.activate(base), 5)
                await conn.close()
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                return
            acknowledged.append(base.cmid_text)
            if len(acknowledged) == 150:
                kmsd.process.send_signal(signal.SIGKILL)
                killed.set()

    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(8))), 60)
    kmsd.process.wait(timeout=10)
    kmsd.drain()
    assert kmsd.process.returncode == -signal.SIGKILL
    assert len(acknowledged) >= 150
    stored = {r[0] for r in rows(Path(path), "SELECT client FROM records")}
    missing = set(acknowledged) - stored
    assert not missing, f"{len(missing)} acknowledged clients lost"


async def test_admin_commands_on_a_running_daemon(tmp_path: Path) -> None:
    path = str(tmp_path / "kmsd.db")
    kmsd = start_kmsd(db=path)
    try:
        for _ in range(3):
            await activate(
                kmsd.host, kmsd.port, "Windows 10/11 Enterprise", workstation="lab-01.test"
            )
        await activate(kmsd.host, kmsd.port, "Office LTSC Professional Plus 2021")
        listing = await asyncio.to_thread(run_kmsd, "clients", "--db", path, "--json")
        assert listing.returncode == 0, listing.stderr
        entries = json.loads(listing.stdout)
        assert len(entries) == 4 and all(e["counted"] for e in entries)
        assert {e["application"] for e in entries} == {"Windows", "Office 2013 and later"}
        table = await asyncio.to_thread(run_kmsd, "clients", "--db", path, "--app", "Windows")
        assert table.stdout.splitlines()[0].split()[:3] == ["APPLICATION", "CLIENT", "ID"]
        assert table.stdout.count("lab-01.test") == 3
        stats = await asyncio.to_thread(run_kmsd, "stats", "--db", path, "--json")
        by_app = {s["application"]: s for s in json.loads(stats.stdout)}
        assert by_app["Windows"]["count"] == 3 and by_app["Windows"]["capacity"] == 50
        assert by_app["Windows"]["thresholds"] == {"25": False}
        victim = next(e["client"] for e in entries if e["application"] == "Windows")
        refused = await asyncio.to_thread(run_kmsd, "forget", victim, "--db", path)
        assert refused.returncode == 1 and "--yes" in refused.stderr
        forget = await asyncio.to_thread(run_kmsd, "forget", victim, "--db", path, "--yes")
        assert forget.returncode == 0 and "1 record(s) removed" in forget.stdout
        # The running daemon applied it: the next new client counts 3, not 4.
        assert await activate(kmsd.host, kmsd.port, "Windows 10/11 Enterprise") == 3
        reset = await asyncio.to_thread(
            run_kmsd, "reset", "--app", "Windows", "--db", path, "--yes"
        )
        assert reset.returncode == 0 and "3 record(s) removed" in reset.stdout
        assert await activate(kmsd.host, kmsd.port, "Windows Server 2022 Standard") == 1
        assert await activate(kmsd.host, kmsd.port, "Office LTSC Professional Plus 2021") == 2
    finally:
        stop_kmsd(kmsd)
    assert len(rows(Path(path), "SELECT * FROM records")) == 3


def test_admin_commands_without_a_daemon(tmp_path: Path) -> None:
    path = tmp_path / "kmsd.db"
    missing = run_kmsd("stats", "--db", str(path))
    assert missing.returncode == 1 and "no such database" in missing.stderr
    store = SqliteStore(table_settings(path), known=KNOWN)
    client = request()
    with store.db:
        store.db.execute(
            "INSERT INTO clients VALUES (?, ?, 'w', ?, ?, '6.0', 25, 0, 1, 'a', 1, 1, 1, ?, 1)",
            (
                guid_text(client.application_id),
                client.cmid_text,
                guid_text(client.sku_id),
                guid_text(client.kms_id),
                NOW,
            ),
        )
    store.db.close()
    store._release_lock()
    answer = run_kmsd("forget", client.cmid_text, "--db", str(path), stdin="y\n")
    assert answer.returncode == 1  # no terminal to ask and no --yes
    done = run_kmsd("forget", client.cmid_text, "--db", str(path), "--yes")
    assert done.returncode == 0 and "1 record(s) removed" in done.stdout
    assert rows(path, "SELECT * FROM records") == []
    bad = run_kmsd("reset", "--app", "Linux", "--db", str(path), "--yes")
    assert bad.returncode == 1 and "unknown application 'Linux'" in bad.stderr


def test_printed_table_is_aligned() -> None:
    import io

    out = io.StringIO()
    tablecmd.print_table([["a", "bbbb"], ["ccc", "d"]], ["X", "Y"], out)
    lines = out.getvalue().splitlines()
    assert lines == ["X    Y", "a    bbbb", "ccc  d"]


async def test_below_threshold_log_names_the_override(tmp_path: Path) -> None:
    kmsd = start_kmsd()
    try:
        await activate(kmsd.host, kmsd.port, "Windows 10/11 Enterprise")
        entry = await asyncio.to_thread(kmsd.read_log_until, "activation")
    finally:
        stop_kmsd(kmsd)
    assert "count 1 of 25" in str(entry["below_threshold"])
    assert "--precharge 24" in str(entry["below_threshold"])


async def test_lab_overrides_are_logged_at_start_and_work(tmp_path: Path) -> None:
    kmsd = start_kmsd("--precharge", "24", "--record-lifetime", "7")
    try:
        assert await activate(kmsd.host, kmsd.port, "Windows 10/11 Enterprise") == 25
    finally:
        stop_kmsd(kmsd)
    overrides = {e.get("override") for e in kmsd.log if str(e["event"]).startswith("lab override")}
    assert overrides == {"precharge", "record_lifetime_days"}


async def test_one_batch_keeps_the_order_of_evictions_and_admin_commands(tmp_path: Path) -> None:
    path = tmp_path / "kmsd.db"
    store = SqliteStore(table_settings(path, capacity=2), known=KNOWN)
    a, b, c, d = (request() for _ in range(4))
    for i, r in enumerate((a, b, c)):  # c evicts a within the same batch
        store.count(r, NOW + i, "x")
    store._apply_command(0, "reset", guid_text(a.application_id))  # queued after a, b, c
    store.count(d, NOW + 5, "x")  # counted after the reset: must survive it
    store.start(asyncio.get_running_loop())
    await asyncio.wait_for(store.barrier(), 10)
    await store.close()
    in_table = {r[0] for r in rows(path, "SELECT client FROM records")}
    assert in_table == {d.cmid_text}
    history = {r[0] for r in rows(path, "SELECT client FROM clients")}
    assert history == {r.cmid_text for r in (a, b, c, d)}
    again = SqliteStore(table_settings(path, capacity=2), known=KNOWN)
    assert ids(table_of(again, d.application_id)) == [d.client_machine_id]


def test_the_log_is_the_journal_and_checkpoints_leave_the_loop(tmp_path: Path) -> None:
    store = SqliteStore(table_settings(tmp_path / "kmsd.db", synchronous="full"))
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # Commits on the loop only write the log; "full" flushes it with its own fdatasync.
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 1
    assert store.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0


@pytest.mark.parametrize("mode", ["normal", "full"])
async def test_replies_wait_for_the_log_flush_only_in_full_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    flushing = threading.Event()
    release = threading.Event()
    flushed: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        flushing.set()
        assert release.wait(10)
        real(fd)
        flushed.append(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    path = tmp_path / "kmsd.db"
    store = SqliteStore(table_settings(path, synchronous=mode), known=KNOWN)
    store.start(asyncio.get_running_loop())
    first = request()
    store.count(first, NOW, "a")
    barrier = store.barrier()
    if mode == "normal":
        await asyncio.wait_for(barrier, 10)  # committed to the log: that is all it waits for
        assert not flushing.is_set()
    else:
        await asyncio.wait_for(asyncio.to_thread(flushing.wait, 10), 11)
        # Committed (another connection sees it), but the reply still waits for the flush.
        assert {r[0] for r in rows(path, "SELECT client FROM records")} == {first.cmid_text}
        assert not barrier.done()
        second = request()
        store.count(second, NOW + 1, "a")  # commits while the flush runs
        later = store.barrier()
        release.set()
        await asyncio.wait_for(barrier, 10)
        await asyncio.wait_for(later, 10)  # the next flush takes the commit made meanwhile
        assert len(flushed) == 2
    release.set()
    await store.close()


async def test_an_eviction_at_the_oldest_end_writes_no_row_of_the_evicted(
    tmp_path: Path,
) -> None:
    """A full table evicts on every new client: the record leaves by the application's
    low_seq, so a commit writes the new client's row and the application's, not the
    evicted client's. A record leaving elsewhere (the clock went back) is written."""
    path = tmp_path / "kmsd.db"
    store = SqliteStore(table_settings(path, capacity=2), known=KNOWN)
    store.start(asyncio.get_running_loop())
    a, b, c, d = (request() for _ in range(4))
    for i, r in enumerate((a, b)):
        store.count(r, NOW + i, "x")
    await asyncio.wait_for(store.barrier(), 10)
    changes = store.db.total_changes
    store.count(c, NOW + 2, "x")  # evicts a, the oldest
    await asyncio.wait_for(store.barrier(), 10)
    assert store.db.total_changes - changes == 2  # c's row, the application's
    evicted = f"SELECT recorded_at FROM clients WHERE client = '{a.cmid_text}'"
    assert rows(path, evicted) == [(NOW,)]  # as it was: only low_seq moved past it
    in_table = {r[0] for r in rows(path, "SELECT client FROM records")}
    assert in_table == {b.cmid_text, c.cmid_text}
    # The clock goes back: d evicts b and is recorded as older than c, so the table
    # (oldest first by time) is d, c while their seqs are in the order c, d. The next
    # client evicts d, which is not the oldest by seq: its row is written.
    store.count(d, NOW - 10, "x")
    store.count(e := request(), NOW + 3, "x")
    await asyncio.wait_for(store.barrier(), 10)
    assert ids(table_of(store, a.application_id)) == [
        c.client_machine_id,
        e.client_machine_id,
    ]
    assert rows(path, "SELECT client FROM records ORDER BY seq") == [
        (c.cmid_text,),
        (e.cmid_text,),
    ]
    dropped = f"SELECT recorded_at FROM clients WHERE client = '{d.cmid_text}'"
    assert rows(path, dropped) == [(None,)]
    await store.close()


async def test_history_of_clients_gone_for_long_is_pruned(tmp_path: Path) -> None:
    path = tmp_path / "kmsd.db"
    store = SqliteStore(table_settings(path, capacity=1, history=10 * DAY), known=KNOWN)
    old, evicted, current = request(), request(), request()
    store.count(old, NOW, "a")  # in the table, then evicted by the next one
    store.count(evicted, NOW + 1, "a")  # evicted in turn by current, but seen recently
    store.count(current, NOW + 20 * DAY, "a")
    store.start(asyncio.get_running_loop())
    await asyncio.wait_for(store.barrier(), 10)
    await store.close()  # the first commit prunes
    history = {r[0] for r in rows(path, "SELECT client FROM clients")}
    assert history == {current.cmid_text}
    # Without a retention, nothing is pruned.
    keep = SqliteStore(table_settings(tmp_path / "keep.db", capacity=1, history=None), known=KNOWN)
    for i, r in enumerate((old, evicted, current)):
        keep.count(r, NOW + i * 20 * DAY, "a")
    keep.start(asyncio.get_running_loop())
    await asyncio.wait_for(keep.barrier(), 10)
    await keep.close()
    assert len(rows(tmp_path / "keep.db", "SELECT client FROM clients")) == 3


async def test_a_commit_runs_its_callbacks_at_once_and_can_be_awaited() -> None:
    commit, seen = Commit(), []

    def broken(_: Commit) -> None:
        raise RuntimeError("a waiter's bug")

    commit.add_done_callback(lambda c: seen.append(("first", c.exception())))
    commit.add_done_callback(broken)
    commit.add_done_callback(lambda c: seen.append(("third", c.exception())))
    waiter = asyncio.ensure_future(asyncio.wait_for(commit, 10))
    await asyncio.sleep(0)  # the waiter is waiting
    assert not commit.done() and not seen
    commit.settle()
    assert seen == [("first", None), ("third", None)]  # in this very call, despite `broken`
    await waiter
    commit.add_done_callback(lambda c: seen.append(("late", c.exception())))
    assert seen[-1] == ("late", None)  # a settled commit calls back at once
    failed = Commit()
    failed.settle(StoreError("disk full"))
    with pytest.raises(StoreError, match="disk full"):
        await failed


async def test_a_failed_log_flush_drops_its_replies_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fdatasync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    store = SqliteStore(table_settings(tmp_path / "kmsd.db", synchronous="full"), known=KNOWN)
    store.start(asyncio.get_running_loop())
    store.count(request(), NOW, "a")
    with pytest.raises(StoreError, match=r"flush failed: .*Input/output error"):
        await asyncio.wait_for(store.barrier(), 10)
    assert store.failures == 1 and not store.commit_ok  # /readyz reports it
    monkeypatch.undo()
    store.count(request(), NOW + 1, "a")
    await asyncio.wait_for(store.barrier(), 10)  # the disk is back: replies flow again
    await store.close()


# A restart finds the tables the daemon had: any history of requests, clocks and commands.

CLIENTS = [UUID(int=i + 1) for i in range(6)]
SKUS = ("Windows 10/11 Enterprise", "Office LTSC Professional Plus 2021")
STEPS = (0.0, 1.0, 3600.0, 20 * DAY, 31 * DAY, -7200.0, -40 * DAY)  # the clock may go back
OPS = st.one_of(
    st.tuples(
        st.just("count"),
        st.sampled_from(SKUS),
        st.integers(0, len(CLIENTS) - 1),
        st.integers(1, 3),  # required count: tables of 2, 4, 6 records, growing
        st.sampled_from(STEPS),
    ),
    st.tuples(st.just("forget"), st.integers(0, len(CLIENTS) - 1)),
    st.tuples(st.just("reset"), st.sampled_from(("", *SKUS))),
    st.tuples(st.just("commit")),
    st.tuples(st.just("restart")),
)


def tables(store: SqliteStore) -> dict[UUID, TableView]:
    return {
        app: table
        for app, table in store.counter.snapshot().items()
        if table.records or table.capacity
    }


async def replay(path: str, ops: list[tuple[Any, ...]]) -> None:
    store = SqliteStore(table_settings(path), known=KNOWN)
    store.start(asyncio.get_running_loop())
    now, command = NOW, 0
    for op in ops:
        if op[0] == "count":
            _, sku, client, required, step = op
            now += step
            r = request(sku, client_machine_id=CLIENTS[client], required_count=required)
            store.count(r, now, "127.0.0.1:1")
        elif op[0] in ("forget", "reset"):
            command += 1
            if op[0] == "forget":
                argument = str(CLIENTS[op[1]])
            else:
                sku = DB.sku_by_name(op[1]) if op[1] else None
                argument = str(sku.kms.application.id) if sku else ""
            store._apply_command(command, op[0], argument)
        elif op[0] == "commit":
            await asyncio.wait_for(store.barrier(), 10)
        else:
            before = tables(store)
            await store.close()
            store = SqliteStore(table_settings(path), known=KNOWN)
            assert tables(store) == before
            store.start(asyncio.get_running_loop())
    before = tables(store)
    await store.close()
    assert tables(SqliteStore(table_settings(path), known=KNOWN)) == before


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, max_size=40))
@example(  # a forgotten client's seq was reused at or under low_seq: hidden after a restart
    ops=[
        ("count", SKUS[0], 0, 1, 0.0),
        ("count", SKUS[0], 0, 1, 31 * DAY),  # its first record expired: low_seq moves up
        ("forget", 0),
        ("restart",),
        ("count", SKUS[0], 0, 1, 0.0),
        ("restart",),
    ]
)
def test_a_restart_finds_the_tables_as_they_were(ops: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(replay(os.path.join(directory, "kmsd.db"), ops))


async def test_memory_stays_flat_whatever_ids_clients_send(tmp_path: Path) -> None:
    """Random SKU, KMS and client IDs: once the working copy is full (50 Windows records),
    nothing the store keeps grows with the number of distinct IDs seen."""
    import tracemalloc

    store = SqliteStore(table_settings(tmp_path / "kmsd.db"), known=KNOWN)
    store.start(asyncio.get_running_loop())
    rng = random.Random(16)

    async def burst(n: int) -> None:
        for i in range(n):
            r = request()
            r = dataclasses.replace(r, sku_id=rng.randbytes(16))
            r = dataclasses.replace(r, kms_id=rng.randbytes(16))
            store.count(r, NOW + i, "127.0.0.1:1")
            if i % 100 == 99:
                await asyncio.wait_for(store.barrier(), 10)
        await asyncio.wait_for(store.barrier(), 10)

    tracemalloc.start()
    try:
        await burst(3000)  # fills the table and any bounded cache
        before = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*kmsd*")])
        await burst(3000)
        after = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*kmsd*")])
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown < 64 * 1024, f"{grown} bytes more after 3,000 more distinct IDs"
    await store.close()


# The log stays bounded, the database file is watched, a user must reach the database.


async def test_the_log_stays_within_its_limit_under_sustained_commits(tmp_path: Path) -> None:
    path = tmp_path / "kmsd.db"
    limit = 256 * 1024
    store = SqliteStore(table_settings(path, capacity=100_000, wal_limit=limit), known=KNOWN)
    store.start(asyncio.get_running_loop())
    log = Path(f"{path}-wal")
    peak = 0
    clients = []
    for i in range(1500):  # commits back to back, as under full load
        for _ in range(4):
            clients.append(request())
            store.count(clients[-1], NOW + i, "127.0.0.1:1")
        await asyncio.wait_for(store.barrier(), 10)
        peak = max(peak, log.stat().st_size)
    await store.close()
    one_commit = 128 * 1024  # 4 clients: each a leaf, its parents, maybe a split
    assert peak <= limit + one_commit, f"log reached {peak} bytes"
    stored = {r[0] for r in rows(path, "SELECT client FROM records")}
    assert stored == {c.cmid_text for c in clients}


as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@as_root
def test_a_user_who_cannot_reach_the_database_is_refused_at_start(tmp_path: Path) -> None:
    """As with the default database under root's home: kmsd opened it as root, the user
    it becomes cannot open it again (pytest's directory is root's, mode 0700)."""
    db = tmp_path / "kmsd" / "kmsd.db"
    db.parent.mkdir(mode=0o700)  # handed to the user, as kmsd's own state directory
    result = run_kmsd("--user", "nobody", "--listen", "127.0.0.1:0", "--db", str(db))
    assert result.returncode == 1
    assert f"{db}: cannot be opened by uid 65534" in result.stderr
    assert "search every directory above it" in result.stderr


def immutable(path: Path) -> bool:
    """chattr +i (root, on a file system that has the attribute)."""
    return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


@as_root
def test_an_immutable_database_is_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "kmsd.db"
    SqliteStore(table_settings(path)).db.close()
    if not immutable(path):
        pytest.skip("chattr +i does not work here")
    try:
        result = run_kmsd("--listen", "127.0.0.1:0", "--db", str(path))
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    assert result.returncode == 1
    assert "kmsd cannot write to this database" in result.stderr
    assert "immutable" in result.stderr


@as_root
def test_a_database_on_a_read_only_mount_is_refused_at_start(tmp_path: Path) -> None:
    """A read-only bind mount in a private mount namespace (unshare -m), as root in CI."""
    path = tmp_path / "kmsd.db"
    SqliteStore(table_settings(path)).db.close()
    script = (
        f"mount --bind {tmp_path} {tmp_path} && mount -o remount,bind,ro {tmp_path} && "
        f"exec {sys.executable} -m kmsd --listen 127.0.0.1:0 --db {path}"
    )
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=30
    )
    if "mount" in result.stderr and "kmsd" not in result.stderr:
        pytest.skip(f"no private read-only mount here: {result.stderr.strip()}")
    assert result.returncode == 1
    assert f"{path}: cannot create its lock file" in result.stderr
    assert "read-only" in result.stderr


async def test_a_deleted_database_is_written_again_and_nothing_is_lost(tmp_path: Path) -> None:
    from tests.test_admin_http import admin_address, http

    path = tmp_path / "kmsd.db"
    kmsd = start_kmsd("--admin", "127.0.0.1:0", db=str(path))
    clients: list[str] = []

    async def activate_one(daemon: KmsdProcess | None = None) -> None:
        assert WIN
        base = base_request(WIN)
        daemon = daemon or kmsd
        conn = await KmsConnection.open(daemon.host, daemon.port)
        try:
            await asyncio.wait_for(conn.activate(base), 10)
        finally:
            await conn.close()
        clients.append(base.cmid_text)

    try:
        address = admin_address(kmsd)
        for _ in range(3):
            await activate_one()
        # Where the copy goes first, a directory: the first tries fail, deterministically.
        (tmp_path / "kmsd.db.new" / "in-the-way").mkdir(parents=True)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        for _ in range(2):
            await activate_one()  # answered: committed to the deleted file meanwhile
        await asyncio.to_thread(kmsd.read_log_until, "cannot write the database to a new file")
        status, _, body = await http(address, "/readyz")
        assert status == 503 and json.loads(body)["checks"]["database_file_ok"] is False
        shutil.rmtree(tmp_path / "kmsd.db.new")
        await asyncio.to_thread(kmsd.read_log_until, "the database was written to a new file", 15)
        status, _, body = await http(address, "/readyz")
        assert status == 200, body
        await activate_one()
    finally:
        assert stop_kmsd(kmsd) == 0
    deleted = [e for e in kmsd.log if str(e["event"]).startswith("the database file was deleted")]
    assert len(deleted) == 1 and deleted[0]["level"] == "error"
    assert {r[0] for r in rows(path, "SELECT client FROM records")} == set(clients)
    again = start_kmsd(db=str(path))  # and a restart serves from it
    try:
        await activate_one(again)
    finally:
        assert stop_kmsd(again) == 0


async def test_a_memory_database_keeps_no_history_beyond_its_tables() -> None:
    """In RAM, a row per client ever seen would grow as long as kmsd runs."""
    store = SqliteStore(table_settings(MEMORY), known=KNOWN)
    store.start(asyncio.get_running_loop())
    for i in range(3000):
        store.count(request(), NOW + i, "127.0.0.1:1")
        if i % 10 == 9:
            await asyncio.wait_for(store.barrier(), 10)
    kept = store.db.execute("SELECT count(*) FROM clients").fetchone()[0]
    in_table = store.db.execute("SELECT count(*) FROM records").fetchone()[0]
    await store.close()
    assert in_table == 50
    assert kept <= in_table + MEMORY_HISTORY + 10
