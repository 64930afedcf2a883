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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar
from uuid import UUID

import structlog

from .cache import RECORD_LIFETIME, MemoryCounter
from .protocol.kms import BaseRequest

log = structlog.get_logger("kmsd.store")
T = TypeVar("T")

MEMORY = ":memory:"
SCHEMA_VERSION = 1
# MIGRATIONS[n] takes a database from schema n - 1 to schema n.
MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE epids (csvlk TEXT PRIMARY KEY, epid TEXT NOT NULL);
    CREATE TABLE apps (application TEXT PRIMARY KEY, capacity INTEGER NOT NULL);
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
        recorded_at REAL,  -- when its record in the table was written; NULL: not in it
        seq INTEGER,  -- order of the records in the table
        PRIMARY KEY (application, client)
    ) WITHOUT ROWID;
    CREATE INDEX clients_in_table ON clients (application, seq)
        WHERE recorded_at IS NOT NULL;
    CREATE VIEW records AS
        SELECT application, client, recorded_at, seq FROM clients
        WHERE recorded_at IS NOT NULL;
    CREATE TABLE commands (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        verb TEXT NOT NULL,
        argument TEXT NOT NULL,
        done INTEGER NOT NULL DEFAULT 0,
        result INTEGER NOT NULL DEFAULT 0
    );
    """,
}
OUR_TABLES = {"meta", "epids", "apps", "clients", "commands", "sqlite_sequence"}
POLL_SECONDS = 0.25  # how often the writer looks for admin commands when idle
MAX_BACKOFF = 5.0
PRUNE_EVERY = 3600.0  # seconds between prunings of the client history
DEFAULT_HISTORY = 180 * 86400.0  # a client not seen for this long drops out of the history


class StoreError(Exception):
    """The database cannot be used; the message says why and what to do."""


def default_path() -> Path:
    """$STATE_DIRECTORY (systemd), else $XDG_STATE_HOME or ~/.local/state, /kmsd/kmsd.db."""
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state) / "kmsd.db"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "kmsd" / "kmsd.db"


def connect(path: str, *, create: bool, synchronous: str = "full") -> sqlite3.Connection:
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
        db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
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
    """One request's effect on the database: the client's row (its last request and its
    record in the table) and the records that left the table."""

    key: tuple[str, str]  # application, client
    row: tuple[object, ...]  # values for _UPSERT_CLIENT
    dropped: list[UUID]
    capacity: int | None  # the table's new capacity, when it changed


Statement = tuple[str, tuple[object, ...]]


@dataclass
class _Batch:
    items: list[_Change | Statement] = field(default_factory=list)  # in the loop's order
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.items or self.waiters)


_UPSERT_CLIENT = """
INSERT INTO clients (application, client, workstation, sku, kms_id, protocol, required,
                     is_vm, license_status, address, first_seen, last_seen, recorded_at, seq,
                     requests)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)
ON CONFLICT (application, client) DO UPDATE SET
    workstation = excluded.workstation, sku = excluded.sku, kms_id = excluded.kms_id,
    protocol = excluded.protocol, required = excluded.required, is_vm = excluded.is_vm,
    license_status = excluded.license_status, address = excluded.address,
    last_seen = excluded.last_seen, recorded_at = excluded.recorded_at, seq = excluded.seq,
    requests = requests + 1
"""
_DROP = """
UPDATE clients SET recorded_at = NULL, seq = NULL
WHERE application = ? AND client = ? AND recorded_at IS NOT NULL
"""


def _write_changes(db: sqlite3.Connection, changes: list[_Change]) -> None:
    """Write a run of changes with one statement each kind, keeping their net effect:
    a record dropped after its last write in the run leaves the table."""
    db.executemany(_UPSERT_CLIENT, [c.row for c in changes])
    written = {c.key: i for i, c in enumerate(changes)}
    dropped: dict[tuple[str, str], int] = {}
    for i, change in enumerate(changes):
        for client in change.dropped:
            dropped[(change.key[0], str(client))] = i
    gone = [key for key, i in dropped.items() if i >= written.get(key, -1)]
    if gone:
        db.executemany(_DROP, gone)
    capacities = {c.key[0]: c.capacity for c in changes if c.capacity}
    if capacities:
        db.executemany(
            "INSERT OR REPLACE INTO apps (application, capacity) VALUES (?, ?)",
            capacities.items(),
        )


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
        synchronous: str = "normal",
        history: float | None = DEFAULT_HISTORY,
    ) -> None:
        """`synchronous`: "normal" commits to the write-ahead log (safe from any crash of
        the process), "full" also flushes it to disk (safe from power loss)."""
        self.path = path
        self.history = history  # seconds; None keeps every client's last request for ever
        self._latest = 0.0  # the latest time counted (the host's clock, maybe virtual)
        self._next_prune = 0.0
        if path != MEMORY:
            Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = None if path == MEMORY else lock_file(path)
        if path != MEMORY and self._lock is None:
            raise StoreError(f"{path}: another kmsd is serving from this database")
        try:
            self.db = connect(path, create=True, synchronous=synchronous)
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
        self.commit_ok = True  # the last commit succeeded (or none was needed yet)
        self._reads: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []

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
        for table in counter.tables.values():
            table.sort()  # written in order, but the clock may have gone back meanwhile
        last = self.db.execute("SELECT max(seq) FROM clients").fetchone()[0]
        self._seq = (last or 0) + 1

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
        self._latest = max(self._latest, now)
        capacity = None
        if self._capacity.get(app) != table.capacity:
            capacity = self._capacity[app] = table.capacity
        key = (str(app), str(request.client_machine_id))
        row = (
            *key,
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
            now,
            self._seq,
        )
        self._seq += 1
        with self._cond:
            items = self._batch.items
            for stale in evicted_tables:
                self._capacity.pop(stale, None)
                items += reset_sql(str(stale))
            items.append(_Change(key, row, dropped, capacity))
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

    def read(self, query: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run `query` on the committed database in the writer thread, between commits
        (for a :memory: database, which no other connection can open)."""
        loop = self._loop
        assert loop is not None, "start() the store first"
        future: asyncio.Future[T] = loop.create_future()
        with self._cond:
            self._reads.append((query, future))
            self._cond.notify()
        return future

    @property
    def writer_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

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
        sql: list[Statement] = []
        affected = 0
        if verb == "forget":
            client = UUID(argument)
            for app, table in self.counter.tables.items():
                if table.records.pop(client, None) is not None:
                    affected += 1
                    sql.append((_DROP, (str(app), argument)))
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
            self._batch.items += sql
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
                reads, self._reads = self._reads, []
                stopping = self._stopping
            batch = _merge(retry, batch)
            retry = _Batch()
            for query, future in reads:
                self._answer_read(query, future)
            if batch.items:
                try:
                    self._commit(batch)
                except sqlite3.Error as exc:
                    self.failures += 1
                    self.commit_ok = False
                    backoff = min(MAX_BACKOFF, backoff * 2 or 0.05)
                    log.error(
                        "commit failed; replies held back, will retry",
                        error=str(exc),
                        changes=len(batch.items),
                        retry_in_s=backoff,
                    )
                    self._settle(batch.waiters, StoreError(f"commit failed: {exc}"))
                    retry = _Batch(batch.items)
                    if stopping:
                        return
                    with self._cond:
                        self._cond.wait(backoff)
                    continue
                backoff = 0.0
                self.commit_ok = True
            self._settle(batch.waiters, None)
            if stopping:
                return
            data_version = self._poll_commands(data_version)
            if self.history is not None and time.monotonic() >= self._next_prune and self._latest:
                self._next_prune = time.monotonic() + PRUNE_EVERY
                self._prune(self._latest - self.history)

    def _prune(self, before: float) -> None:
        """Forget the last request of clients not seen since `before` and not in the table."""
        try:
            with self._transaction():
                gone = self.db.execute(
                    "DELETE FROM clients WHERE recorded_at IS NULL AND last_seen < ?", (before,)
                ).rowcount
        except sqlite3.Error as exc:
            log.error("cannot prune the client history", error=str(exc))
            return
        if gone:
            log.info("client history pruned", clients=gone)

    def _commit(self, batch: _Batch) -> None:
        with self._transaction():
            run: list[_Change] = []
            for item in batch.items:
                if isinstance(item, _Change):
                    run.append(item)
                    continue
                if run:
                    _write_changes(self.db, run)
                    run = []
                self.db.execute(*item)
            if run:
                _write_changes(self.db, run)

    def _answer_read(
        self, query: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any]
    ) -> None:
        try:
            result, error = query(self.db), None
        except sqlite3.Error as exc:
            result, error = None, exc
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(_answer, future, result, error)

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
    return _Batch(first.items + second.items, first.waiters + second.waiters)


def _answer(future: asyncio.Future[Any], result: object, error: Exception | None) -> None:
    if not future.done():
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


def _resolve(waiters: list[asyncio.Future[None]], error: Exception | None) -> None:
    for future in waiters:
        if not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


def reset_sql(application: str) -> list[Statement]:
    """Start one application's table ("" for all) afresh: no records, no capacity.
    The history of clients stays."""
    clear = "UPDATE clients SET recorded_at = NULL, seq = NULL WHERE recorded_at IS NOT NULL"
    if application:
        return [
            (clear + " AND application = ?", (application,)),
            ("DELETE FROM apps WHERE application = ?", (application,)),
        ]
    return [(clear, ()), ("DELETE FROM apps", ())]
