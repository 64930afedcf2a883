"""The durable store: client-ID tables, client history and host identity in SQLite (WAL).

The event loop counts in memory (kmsd.cache) and queues every change here. One writer
thread commits all changes queued so far in one transaction (group commit) and then
resolves the futures of the replies waiting for them: a reply leaves only once its record
is on disk, and the loop never waits for the disk itself.

Admin commands of other processes (`kmsd forget`, `kmsd reset`) reach a running daemon
through the `commands` table, so that its working copy and the file never disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from uuid import UUID

import structlog

from .cache import RECORD_LIFETIME, MemoryCounter
from .protocol.kms import BaseRequest

log = structlog.get_logger("kmsd.store")

MEMORY = ":memory:"
SCHEMA_VERSION = 1
# MIGRATIONS[n] takes a database from schema n - 1 to schema n.
MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE epids (csvlk TEXT PRIMARY KEY, epid TEXT NOT NULL);
    CREATE TABLE apps (application TEXT PRIMARY KEY, capacity INTEGER NOT NULL);
    CREATE TABLE records (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        application TEXT NOT NULL,
        client TEXT NOT NULL,
        recorded_at REAL NOT NULL,
        UNIQUE (application, client)
    );
    CREATE TABLE clients (
        application TEXT NOT NULL,
        client TEXT NOT NULL,
        workstation TEXT NOT NULL,
        sku TEXT NOT NULL,
        kms_id TEXT NOT NULL,
        protocol TEXT NOT NULL,
        required INTEGER NOT NULL,
        is_vm INTEGER NOT NULL,
        license_status INTEGER NOT NULL,
        address TEXT NOT NULL,
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL,
        requests INTEGER NOT NULL,
        PRIMARY KEY (application, client)
    );
    CREATE TABLE commands (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        verb TEXT NOT NULL,
        argument TEXT NOT NULL,
        done INTEGER NOT NULL DEFAULT 0,
        result INTEGER NOT NULL DEFAULT 0
    );
    """,
}
OUR_TABLES = {"meta", "epids", "apps", "records", "clients", "commands", "sqlite_sequence"}
POLL_SECONDS = 0.25  # how often the writer looks for admin commands when idle
MAX_BACKOFF = 5.0


class StoreError(Exception):
    """The database cannot be used; the message says why and what to do."""


def default_path() -> Path:
    """$STATE_DIRECTORY (systemd), else $XDG_STATE_HOME or ~/.local/state, /kmsd/kmsd.db."""
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state) / "kmsd.db"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "kmsd" / "kmsd.db"


def connect(path: str, *, create: bool) -> sqlite3.Connection:
    """Open and migrate a kmsd database; StoreError explains anything that goes wrong."""
    if path != MEMORY:
        file = Path(path)
        if not create and not file.exists():
            raise StoreError(f"{path}: no such database (start kmsd with --db {path} first)")
    try:
        db = sqlite3.connect(path, timeout=2.0, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot open: {exc}") from None
    try:
        _migrate(db, path)
    except sqlite3.DatabaseError as exc:
        db.close()
        if "locked" in str(exc) or "busy" in str(exc):
            raise StoreError(f"{path}: database is locked by another process: {exc}") from None
        raise StoreError(f"{path}: not a kmsd database, or corrupt: {exc}") from None
    except StoreError:
        db.close()
        raise
    return db


def _migrate(db: sqlite3.Connection, path: str) -> None:
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: written by a newer kmsd (schema {version}; this kmsd knows up to "
            f"{SCHEMA_VERSION}). Upgrade kmsd or use another --db."
        )
    if version == 0:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables - OUR_TABLES:
            raise StoreError(f"{path}: not a kmsd database (it has tables {sorted(tables)})")
    for step in range(version + 1, SCHEMA_VERSION + 1):
        try:
            db.executescript(
                f"BEGIN IMMEDIATE; {MIGRATIONS[step]}; PRAGMA user_version={step}; COMMIT;"
            )
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise


def lock_file(path: str) -> IO[bytes] | None:
    """Take the daemon lock of a database; None if another process holds it."""
    handle = open(f"{path}.lock", "ab")  # noqa: SIM115 - held for the daemon's lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


@dataclass(slots=True)
class _Change:
    """One request's effect on the database."""

    application: str
    client: str
    recorded_at: float
    dropped: list[UUID]
    capacity: int | None  # the table's new capacity, when it changed
    seen: tuple[object, ...]  # values of the clients row


@dataclass
class _Batch:
    changes: list[_Change] = field(default_factory=list)
    sql: list[tuple[str, tuple[object, ...]]] = field(default_factory=list)  # admin work
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.changes or self.sql or self.waiters)


_UPSERT_CLIENT = """
INSERT INTO clients (application, client, workstation, sku, kms_id, protocol, required,
                     is_vm, license_status, address, first_seen, last_seen, requests)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)
ON CONFLICT (application, client) DO UPDATE SET
    workstation = excluded.workstation, sku = excluded.sku, kms_id = excluded.kms_id,
    protocol = excluded.protocol, required = excluded.required, is_vm = excluded.is_vm,
    license_status = excluded.license_status, address = excluded.address,
    last_seen = excluded.last_seen, requests = requests + 1
"""


class SqliteStore:
    """A CountStore whose working copy is in memory and whose changes are committed in
    groups by a writer thread."""

    def __init__(
        self,
        path: str,
        *,
        known: frozenset[UUID] = frozenset(),
        lifetime: float = RECORD_LIFETIME,
        fixed_capacity: int | None = None,
    ) -> None:
        self.path = path
        if path != MEMORY:
            Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = None if path == MEMORY else lock_file(path)
        if path != MEMORY and self._lock is None:
            raise StoreError(f"{path}: another kmsd is serving from this database")
        try:
            self.db = connect(path, create=True)
        except StoreError:
            self._release_lock()
            raise
        self.counter = MemoryCounter(known, lifetime, fixed_capacity=fixed_capacity)
        self._capacity: dict[UUID, int] = {}
        self._load()
        self._cond = threading.Condition()
        self._batch = _Batch()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.failures = 0  # commits that failed (and were retried)

    def _load(self) -> None:
        counter = self.counter
        for app, capacity in self.db.execute("SELECT application, capacity FROM apps"):
            table = counter.table(UUID(app))
            table.capacity = counter.fixed_capacity or capacity
            self._capacity[UUID(app)] = capacity
        for app, client, recorded_at in self.db.execute(
            "SELECT application, client, recorded_at FROM records ORDER BY seq"
        ):
            counter.table(UUID(app)).records[UUID(client)] = recorded_at

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # Identity -----------------------------------------------------------------------

    def load_identity(self) -> tuple[bytes | None, dict[str, str]]:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'hwid'").fetchone()
        epids = dict(self.db.execute("SELECT csvlk, epid FROM epids").fetchall())
        return (bytes.fromhex(row[0]) if row else None), epids

    def save_identity(self, hwid: bytes, epids: dict[str, str]) -> None:
        """Called once at start, before the writer thread runs."""
        with self._transaction():
            self.db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('hwid', ?)", (hwid.hex(),)
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO epids (csvlk, epid) VALUES (?, ?)", epids.items()
            )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # The loop's side ----------------------------------------------------------------

    def count(self, request: BaseRequest, now: float, address: str) -> int:
        app = request.application_id
        dropped: list[UUID] = []
        evicted_tables: list[UUID] = []
        table = self.counter.table(app, evicted_tables)
        count = table.record(request.client_machine_id, request.required_count, now, dropped)
        capacity = None
        if self._capacity.get(app) != table.capacity:
            capacity = self._capacity[app] = table.capacity
        change = _Change(
            str(app),
            str(request.client_machine_id),
            now,
            dropped,
            capacity,
            (
                str(app),
                str(request.client_machine_id),
                request.workstation,
                str(request.sku_id),
                str(request.kms_id),
                f"{request.major}.{request.minor}",
                request.required_count,
                request.is_vm,
                request.license_status,
                address,
                now,
                now,
            ),
        )
        with self._cond:
            self._batch.changes.append(change)
            for stale in evicted_tables:
                self._capacity.pop(stale, None)
                self._batch.sql += reset_sql(str(stale))
        return count

    def barrier(self) -> asyncio.Future[None]:
        """A future that completes once everything counted so far is committed."""
        loop = self._loop
        assert loop is not None, "start() the store first"
        future = loop.create_future()
        with self._cond:
            self._batch.waiters.append(future)
            self._cond.notify()
        return future

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="kmsd-store", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Commit what is queued, stop the writer and close the database."""
        if self._thread is not None:
            with self._cond:
                self._stopping = True
                self._cond.notify()
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self.db.close()
        self._release_lock()

    def _apply_command(self, command_id: int, verb: str, argument: str) -> None:
        """Runs in the loop: apply an admin command to the working copy, queue its SQL."""
        sql: list[tuple[str, tuple[object, ...]]] = []
        affected = 0
        if verb == "forget":
            client = UUID(argument)
            for app, table in self.counter.tables.items():
                if table.records.pop(client, None) is not None:
                    affected += 1
                    sql.append(
                        (
                            "DELETE FROM records WHERE application = ? AND client = ?",
                            (str(app), argument),
                        )
                    )
        elif verb == "reset":
            apps = [UUID(argument)] if argument else list(self.counter.tables)
            for app in apps:
                if (emptied := self.counter.tables.get(app)) is not None:
                    affected += len(emptied.records)
                    emptied.records.clear()
                    emptied.capacity = emptied.fixed_capacity or 0
                self._capacity.pop(app, None)
            sql += reset_sql(argument)
        sql.append(
            ("UPDATE commands SET done = 1, result = ? WHERE id = ?", (affected, command_id))
        )
        log.info("admin command applied", command=verb, argument=argument, records=affected)
        with self._cond:
            self._batch.sql += sql
            self._cond.notify()

    # The writer thread --------------------------------------------------------------

    def _run(self) -> None:
        data_version = self.db.execute("PRAGMA data_version").fetchone()[0]
        backoff = 0.0
        retry = _Batch()
        while True:
            with self._cond:
                if not self._batch and not self._stopping:
                    self._cond.wait(POLL_SECONDS)
                batch, self._batch = self._batch, _Batch()
                stopping = self._stopping
            batch = _merge(retry, batch)
            retry = _Batch()
            if batch.changes or batch.sql:
                try:
                    self._commit(batch)
                except sqlite3.Error as exc:
                    self.failures += 1
                    backoff = min(MAX_BACKOFF, backoff * 2 or 0.05)
                    log.error(
                        "commit failed; replies held back, will retry",
                        error=str(exc),
                        changes=len(batch.changes),
                        retry_in_s=backoff,
                    )
                    self._settle(batch.waiters, StoreError(f"commit failed: {exc}"))
                    retry = _Batch(batch.changes, batch.sql)
                    if stopping:
                        return
                    with self._cond:
                        self._cond.wait(backoff)
                    continue
                backoff = 0.0
            self._settle(batch.waiters, None)
            if stopping:
                return
            data_version = self._poll_commands(data_version)

    def _commit(self, batch: _Batch) -> None:
        changes = batch.changes
        with self._transaction():
            db = self.db
            dropped = [(c.application, str(d)) for c in changes for d in c.dropped]
            if dropped:
                db.executemany("DELETE FROM records WHERE application = ? AND client = ?", dropped)
            db.executemany(
                "INSERT OR REPLACE INTO records (application, client, recorded_at) "
                "VALUES (?, ?, ?)",
                [(c.application, c.client, c.recorded_at) for c in changes],
            )
            capacities = [(c.application, c.capacity) for c in changes if c.capacity]
            if capacities:
                db.executemany(
                    "INSERT OR REPLACE INTO apps (application, capacity) VALUES (?, ?)",
                    capacities,
                )
            db.executemany(_UPSERT_CLIENT, [c.seen for c in changes])
            for statement, args in batch.sql:
                db.execute(statement, args)

    def _settle(self, waiters: list[asyncio.Future[None]], error: Exception | None) -> None:
        if waiters and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(_resolve, waiters, error)

    def _poll_commands(self, data_version: int) -> int:
        """Hand admin commands written by other processes to the loop."""
        try:
            current = self.db.execute("PRAGMA data_version").fetchone()[0]
            if current == data_version:
                return int(current)
            rows = self.db.execute(
                "SELECT id, verb, argument FROM commands WHERE done = 0 ORDER BY id"
            ).fetchall()
        except sqlite3.Error as exc:
            log.error("cannot read admin commands", error=str(exc))
            return data_version
        if rows and self._loop is not None:
            for row in rows:
                self._loop.call_soon_threadsafe(self._apply_command, *row)
        return int(current)


def _merge(first: _Batch, second: _Batch) -> _Batch:
    if not first:
        return second
    return _Batch(
        first.changes + second.changes, first.sql + second.sql, first.waiters + second.waiters
    )


def _resolve(waiters: list[asyncio.Future[None]], error: Exception | None) -> None:
    for future in waiters:
        if not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


def reset_sql(application: str) -> list[tuple[str, tuple[object, ...]]]:
    """Start one application's table ("" for all) afresh: no records, no capacity.
    The history of clients stays."""
    if application:
        return [
            ("DELETE FROM records WHERE application = ?", (application,)),
            ("DELETE FROM apps WHERE application = ?", (application,)),
        ]
    return [("DELETE FROM records", ()), ("DELETE FROM apps", ())]
