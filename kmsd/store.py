"""The durable store: client-ID tables, client history and host identity in SQLite (WAL).

The event loop counts in memory (kmsd.cache) and queues every change here. After the
loop's next look for I/O, everything counted so far is written in one transaction (group
commit) on the loop's own thread, and then the replies waiting for it leave: a reply
leaves only once its record is committed to the write-ahead log, which survives any crash
of the process. Writing to the log is a write() into the page cache, not a wait for the
disk; what waits for the disk runs in threads: checkpoints (the log copied into the
database, with their own connection) and, with synchronous "full", an fdatasync of the
log before the replies of the commits it covers leave (pipelined: commits go on while a
flush runs).

All of kmsd's SQL is here, the reads of `kmsd clients` / `kmsd stats` and of the admin
endpoint included. The commands of other processes (`kmsd forget`, `kmsd reset`) reach a
running daemon through the `commands` table, so that its working copy and the file never
disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import math
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import quote
from uuid import UUID

import structlog

from .cache import MemoryCounter
from .commit import Commit
from .protocol.kms import BaseRequest, guid_text
from .protocol.products import ProductNameError, products

log = structlog.get_logger("kmsd.store")
T = TypeVar("T")

MEMORY = ":memory:"
SCHEMA_VERSION = 3
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
    # The index kept the records in order for the start-up load, which sorts them anyway;
    # every count moved a client's entry in it, doubling the pages each commit writes.
    2: """
    DROP INDEX clients_in_table;
    """,
    # Records leave a table mostly at its oldest end (eviction, expiry): raising the
    # application's low_seq takes them out without writing their rows, a page less per
    # activation once the table is full. Other records leave by recorded_at = NULL.
    3: """
    ALTER TABLE apps ADD COLUMN low_seq INTEGER NOT NULL DEFAULT 0;
    DROP VIEW records;
    CREATE VIEW records AS
        SELECT c.application, c.client, c.recorded_at, c.seq
        FROM clients AS c LEFT JOIN apps AS a ON a.application = c.application
        WHERE c.recorded_at IS NOT NULL AND c.seq > coalesce(a.low_seq, 0);
    """,
}
OVERRIDE_KEYS = ("fixed_count", "precharge")  # in meta: the daemon's lab override
OUR_TABLES = {"meta", "epids", "apps", "clients", "commands", "sqlite_sequence"}
POLL_SECONDS = 0.25  # how often the loop looks for admin commands, checkpoints, the file
CHECKPOINT_BUSY = 1.0  # seconds a truncating checkpoint waits for readers to move on
RETRY_SECONDS = 5.0  # before another try at truncating the log or recreating the file
BUSY_MS = 100  # how long a commit waits for another process's write (admin commands)
MAX_BACKOFF = 5.0
PRUNE_EVERY = 3600.0  # seconds between prunings of the client history
MEMORY_HISTORY = 1024  # requests between prunings of a :memory: database's history


# The text the database holds of a request's application, SKU, KMS ID and protocol version,
# by the values as sent: a few hundred in a lab, each made once (one lookup, not one per
# field); clients may send any, so the memo is bounded (emptied when full).
_ProductKey = tuple[bytes, bytes, bytes, int, int]
_PRODUCT_TEXTS: dict[_ProductKey, tuple[str, str, str, str]] = {}
_MAX_PRODUCT_TEXTS = 4096


def _product_texts(key: _ProductKey) -> tuple[str, str, str, str]:
    app, sku, kms_id, major, minor = key
    texts = (guid_text(app), guid_text(sku), guid_text(kms_id), f"{major}.{minor}")
    if len(_PRODUCT_TEXTS) >= _MAX_PRODUCT_TEXTS:
        _PRODUCT_TEXTS.clear()
    _PRODUCT_TEXTS[key] = texts
    return texts


TRUNCATING, RECOVERING = "truncating the log", "recreating the database file"


class StoreError(Exception):
    """The database cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class StoreSettings:
    """The [table] options the store uses (defaults: kmsd.config.OPTIONS)."""

    path: str  # the database file; MEMORY: a throwaway one
    lifetime: float  # seconds a client's record counts
    history: float | None  # seconds a client's last request is kept; None: for ever
    synchronous: str  # "normal": a commit is in the write-ahead log (safe from any crash of
    # the process); "full": the log is also flushed to disk (safe from power loss)
    capacity: int | None  # lab override: a fixed table size
    create_directory: bool  # make the database's directory (kmsd's own state directory)
    wal_limit: int  # bytes the write-ahead log may grow to before commits wait to empty it


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
        if "unable to open" in str(exc) or "readonly" in str(exc):
            raise StoreError(
                f"{path}: cannot open: {exc} (SQLite writes {Path(path).name}-wal and "
                f"{Path(path).name}-shm beside it: is its directory or file system read-only?)"
            ) from None
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


def _identity(path: str) -> tuple[int, int] | None:
    """Which file is at `path` (device, inode); None: none (nor, maybe, its directory)."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return info.st_dev, info.st_ino


def lock_file(path: str) -> IO[bytes] | None:
    """Take the daemon lock of a database; None if another process holds it."""
    try:
        handle = open(f"{path}.lock", "ab")  # noqa: SIM115 - held for the daemon's lifetime
    except OSError as exc:
        raise StoreError(
            f"{path}: cannot create its lock file {path}.lock: {exc.strerror} (is its "
            "directory or file system read-only?)"
        ) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


@dataclass(slots=True)
class _Change:
    """One request's effect on the database: the client's row (its last request and its
    record in the table), the records that left the table other than at its oldest end,
    and the application's row when it changed."""

    key: tuple[str, str]  # application, client: the text the database holds
    row: tuple[object, ...]  # values for _UPSERT_CLIENT
    dropped: list[bytes]  # client IDs as sent
    app: tuple[int, int] | None  # capacity, low_seq


class _Written:
    """What the database holds of one application's table: its capacity and its records
    in the order of their seq, oldest first (client IDs as sent); rows with seq <= low
    have left the table."""

    __slots__ = ("capacity", "low", "seqs")

    def __init__(self, capacity: int = 0, low: int = 0) -> None:
        self.capacity = capacity
        self.low = low
        self.seqs: OrderedDict[bytes, int] = OrderedDict()


Statement = tuple[str, tuple[object, ...]]


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


def _write_changes(db: sqlite3.Cursor, changes: list[_Change]) -> None:
    """Write a run of changes with one statement each kind, keeping their net effect:
    a record dropped after its last write in the run leaves the table. Within one change
    the drops come first: a client whose own record expired is recorded again."""
    db.executemany(_UPSERT_CLIENT, [c.row for c in changes])
    dropped: dict[tuple[str, str], int] = {}
    apps: dict[str, tuple[int, int]] = {}
    for i, change in enumerate(changes):
        for client in change.dropped:
            dropped[(change.key[0], guid_text(client))] = i
        if change.app:
            apps[change.key[0]] = change.app
    if dropped:  # (seldom: most drops are the oldest record, which low_seq takes out)
        written = {c.key: i for i, c in enumerate(changes)}
        gone = [key for key, i in dropped.items() if i > written.get(key, -1)]
        db.executemany(_DROP, gone)
    if apps:
        db.executemany(
            "INSERT INTO apps (application, capacity, low_seq) VALUES (?, ?, ?) ON CONFLICT "
            "(application) DO UPDATE SET capacity = excluded.capacity, low_seq = excluded.low_seq",
            [(app, *values) for app, values in apps.items()],
        )


class SqliteStore:
    """A CountStore whose working copy is in memory and whose changes are committed in
    groups on the event loop's thread."""

    def __init__(self, settings: StoreSettings, *, known: frozenset[UUID] = frozenset()) -> None:
        """`known`: the applications whose tables are kept however stale they are."""
        self.settings = settings
        self.path = path = settings.path
        self.synchronous = settings.synchronous
        self.wal_limit = settings.wal_limit
        self.history = settings.history
        self._latest = 0.0  # the latest time counted (the host's clock, maybe virtual)
        self._next_prune = 0.0
        self._unpruned = 0  # requests since a :memory: database's history was pruned
        if path != MEMORY:
            directory = Path(path).parent
            if settings.create_directory:
                directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            elif not directory.is_dir():
                raise StoreError(
                    f"{path}: no such directory {directory} (kmsd creates only "
                    "its own state directory)"
                )
        self._lock = None if path == MEMORY else lock_file(path)
        if path != MEMORY and self._lock is None:
            raise StoreError(f"{path}: another kmsd is serving from this database")
        try:
            # The flush to disk of "full" is our own fdatasync of the log, off the loop.
            self.db = connect(path, create=True, synchronous="normal")
        except StoreError:
            self._release_lock()
            raise
        try:
            self._prepare()
        except sqlite3.Error as exc:
            self.db.close()
            self._release_lock()
            raise StoreError(
                f"{path}: kmsd cannot write to this database ({exc}); is the file, its "
                "directory or its file system read-only, or the file immutable (lsattr)?"
            ) from None
        self._file = _identity(path)
        self.counter = MemoryCounter(known, settings.lifetime, fixed_capacity=settings.capacity)
        self._written: dict[bytes, _Written] = {}  # by application ID as sent
        self._load()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._items: list[_Change | Statement] = []  # not yet committed, in the loop's order
        self._waiting: Commit | None = None  # the replies of those items
        self._scheduled: asyncio.Handle | None = None  # the next commit
        self._backoff = 0.0
        self.failures = 0  # commits that failed (and were retried)
        self.commit_ok = True  # the last commit succeeded (or none was needed yet)
        self._unsynced: list[Commit] = []  # "full": committed, not yet flushed
        self._syncing = False
        self._wal_fd: int | None = None
        self._cursor: sqlite3.Cursor | None = None  # the commits', on self.db
        self._commits = 0  # since the last checkpoint
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpointing = False
        self.checkpoint_ok = True  # the last checkpoint worked (or none was needed yet)
        self.file_ok = True  # the database file is where kmsd opened it
        self._held: str | None = None  # why commits wait: TRUNCATING, RECOVERING
        self._truncate_after = 0.0  # (monotonic) not before, after a failed try
        self._recover_after = 0.0  # (monotonic) the same for recreating the file
        self._recovering = False  # the copy to a new file runs
        self._background: set[asyncio.Future[Any]] = set()  # checkpoint, flush: in threads
        self._poller: asyncio.TimerHandle | None = None
        self._data_version = 0

    def _prepare(self) -> None:
        """Set the connection up, and write once: a database kmsd cannot write to would
        otherwise look ready and fail at the first commit."""
        self.db.execute(f"PRAGMA busy_timeout={BUSY_MS}")
        self.db.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run in a thread
        with self._transaction():
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _load(self) -> None:
        """The working copy from the database, whose GUIDs are text (of UUIDs)."""
        written = self._written
        capacities: dict[bytes, int] = {}
        for app, capacity, low in self.db.execute(
            "SELECT application, capacity, low_seq FROM apps"
        ):
            app_id = UUID(app).bytes_le
            capacities[app_id] = capacity
            written[app_id] = _Written(capacity, low)
        records: dict[bytes, list[tuple[bytes, float]]] = {app: [] for app in capacities}
        applications: dict[str, bytes] = {}
        for app, client, recorded_at, seq in self.db.execute(
            "SELECT application, client, recorded_at, seq FROM records ORDER BY seq"
        ):
            application = applications.get(app)
            if application is None:
                application = applications[app] = UUID(app).bytes_le
            cmid = UUID(client).bytes_le
            records.setdefault(application, []).append((cmid, recorded_at))
            written.setdefault(application, _Written()).seqs[cmid] = seq
        for application, kept in records.items():
            self.counter.table(application).restore(capacities.get(application, 0), kept)
        # Above every seq a record had, and above every application's low_seq: a client
        # forgotten or reset took its seq with it, and a new record at or under low_seq
        # would be hidden by the records view at the next start.
        last = self.db.execute(
            "SELECT max(coalesce((SELECT max(seq) FROM clients), 0), "
            "coalesce((SELECT max(low_seq) FROM apps), 0))"
        ).fetchone()[0]
        self._seq = last + 1

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
        """Called once at start, before any request is counted."""
        with self._transaction():
            self.db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('hwid', ?)", (hwid.hex(),)
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO epids (csvlk, epid) VALUES (?, ?)", epids.items()
            )

    def save_override(self, fixed_count: int | None, precharge: int) -> None:
        """Record the lab override the daemon answers with (at start and at each reload), so
        that `kmsd stats` in another process shows the count clients are told even when the
        override was given on the daemon's command line only."""
        if self.path == MEMORY:
            return
        values = {OVERRIDE_KEYS[0]: "" if fixed_count is None else str(fixed_count),
                  OVERRIDE_KEYS[1]: str(precharge)}  # fmt: skip
        try:
            with self._transaction():
                self.db.executemany(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", values.items()
                )
        except sqlite3.Error as exc:
            log.error("cannot record the lab override for kmsd stats", error=str(exc))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # Counting -----------------------------------------------------------------------

    def count(self, request: BaseRequest, now: float, address: str) -> int:
        app = request.application_id
        dropped: list[bytes] = []
        evicted_tables: list[bytes] = []
        table = self.counter.table(app, evicted_tables)
        count = table.record(request.client_machine_id, request.required_count, now, dropped)
        if now > self._latest:
            self._latest = now
        written = self._written.get(app)
        if written is None:
            written = self._written[app] = _Written()
        seqs, low, explicit = written.seqs, written.low, []
        for client in dropped:  # mostly the oldest record: then low_seq takes it out
            if next(iter(seqs)) == client:
                written.low = seqs.popitem(last=False)[1]
            else:
                del seqs[client]
                explicit.append(client)
        seqs[request.client_machine_id] = self._seq
        seqs.move_to_end(request.client_machine_id)
        app_row = None
        if written.low != low or written.capacity != table.capacity:
            written.capacity = table.capacity
            app_row = (table.capacity, written.low)
        product = (app, request.sku_id, request.kms_id, request.major, request.minor)
        texts = _PRODUCT_TEXTS.get(product) or _product_texts(product)
        key = (texts[0], request.cmid_text)
        row = (
            *key,
            request.workstation,
            texts[1],
            texts[2],
            texts[3],
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
        for stale in evicted_tables:  # its working copy is gone already
            self._reset(stale)
        self._items.append(_Change(key, row, explicit, app_row))
        self._schedule()
        return count

    def barrier(self) -> Commit:
        """The Commit that completes once everything counted so far is committed (and,
        with synchronous "full", flushed to disk); one serves a whole group."""
        assert self._loop is not None, "start() the store first"
        if self._waiting is None:
            self._waiting = Commit()
        self._schedule()
        return self._waiting

    async def read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        """Run `query` on the committed database (what is counted but not yet committed
        is not in it), in a thread with its own read-only connection so that the loop
        never waits for the disk; a :memory: database, which no other connection can
        open, is read on the loop (a lab-sized table)."""
        try:
            if self.path == MEMORY:
                return query(self.db)
            return await asyncio.to_thread(_read_only, self.path, query)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the database: {exc}") from None

    async def clients(self, now: float, application: str | None = None) -> list[ClientRow]:
        """What `kmsd clients` shows: read_clients on the committed database."""
        lifetime = self.counter.lifetime
        return await self.read(lambda db: read_clients(db, now, lifetime, application))

    async def stats(self, now: float) -> list[AppStats]:
        """What `kmsd stats` shows: read_stats on the committed database."""
        lifetime = self.counter.lifetime
        return await self.read(lambda db: read_stats(db, now, lifetime))

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._data_version = self.db.execute("PRAGMA data_version").fetchone()[0]
        self._poller = loop.call_later(POLL_SECONDS, self._poll)
        if self._items:
            self._schedule()

    async def close(self) -> None:
        """Commit what is queued, wait for the threads' work and close the database."""
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        if self._loop is not None:
            while self._background:  # a truncation or a recovery ends, commits go on
                await asyncio.gather(*self._background, return_exceptions=True)
            self._held = None
            if self._scheduled is not None:
                self._scheduled.cancel()
            if self._items or self._waiting is not None:
                self._commit_group()
            if self._scheduled is not None:  # the last commit failed: it stays undone
                self._scheduled.cancel()
                self._scheduled = None
            while self._background:
                await asyncio.gather(*self._background, return_exceptions=True)
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None
        self.db.close()
        self._release_lock()

    def _schedule(self, delay: float = 0.0) -> None:
        """Commit once the loop has looked for I/O one more time: everything counted in
        this turn and the next is one transaction (group commit), and no reply waits for
        another thread. The extra turn polls without blocking; under load it gathers the
        requests that arrived meanwhile (new connections: about 1.5 -> 2.7 per commit)."""
        if self._loop is None or self._scheduled is not None:
            return  # not started (start() schedules it), or already scheduled
        if delay:
            self._scheduled = self._loop.call_later(delay, self._commit_group)
        else:
            self._scheduled = self._loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        assert self._loop is not None
        self._scheduled = self._loop.call_soon(self._commit_group)

    def _commit_group(self) -> None:
        self._scheduled = None
        if self._held is not None:
            return  # the log is truncated or the file recreated: _release commits
        items, self._items = self._items, []
        waiting, self._waiting = self._waiting, None
        if items:
            try:
                self._commit(items)
            except sqlite3.Error as exc:
                self.failures += 1
                self.commit_ok = False
                self._backoff = min(MAX_BACKOFF, self._backoff * 2 or 0.05)
                log.error(
                    "commit failed; replies held back, will retry",
                    error=str(exc),
                    changes=len(items),
                    retry_in_s=self._backoff,
                )
                self._items = items + self._items
                if waiting is not None:
                    waiting.settle(StoreError(f"commit failed: {exc}"))
                self._schedule(self._backoff)
                return
            self._backoff = 0.0
            self.commit_ok = True
            self._commits += 1
            if self.history is not None and time.monotonic() >= self._next_prune:
                self._next_prune = time.monotonic() + PRUNE_EVERY
                if gone := self._prune(self._latest - self.history):
                    log.info("client history pruned", clients=gone)
            if self.path == MEMORY:
                # In RAM, the history of every client ever seen would grow as long as
                # kmsd runs: a :memory: database keeps only the clients in a table.
                self._unpruned += len(items)
                if self._unpruned > MEMORY_HISTORY:
                    self._unpruned = 0
                    self._prune(math.inf)
            if (
                self._wal_size() > self.wal_limit
                and self.file_ok
                and time.monotonic() >= self._truncate_after
            ):
                self._held = TRUNCATING  # from now on commits wait for the checkpoint
                self._checkpoint()
        if waiting is not None:
            if self.synchronous == "full" and self.path != MEMORY:
                self._unsynced.append(waiting)
                self._flush_log()
            else:
                waiting.settle()

    def _commit(self, items: list[_Change | Statement]) -> None:
        # The transaction of _transaction(), without a generator and a context manager
        # per commit, on one cursor (Connection.execute makes one per call): the hot path.
        cursor = self._cursor
        if cursor is None or cursor.connection is not self.db:
            cursor = self._cursor = self.db.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        try:
            run: list[_Change] = []
            for item in items:
                if isinstance(item, _Change):
                    run.append(item)
                    continue
                if run:
                    _write_changes(cursor, run)
                    run = []
                cursor.execute(*item)
            if run:
                _write_changes(cursor, run)
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        cursor.execute("COMMIT")

    # In threads: flushing the log ("full") and checkpoints ---------------------------

    def _flush_log(self) -> None:
        """fdatasync the write-ahead log in a thread, then release the replies committed
        before it began; commits go on meanwhile and the next flush takes them."""
        if self._syncing or not self._unsynced:
            return
        if self._wal_fd is None:
            self._wal_fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
        waiters, self._unsynced = self._unsynced, []
        self._syncing = True

        def flushed(error: BaseException | None) -> None:
            self._syncing = False
            if error is not None:
                self.failures += 1
                self.commit_ok = False
                log.error("cannot flush the database log; replies dropped", error=str(error))
            for waiter in waiters:
                waiter.settle(None if error is None else StoreError(f"flush failed: {error}"))
            self._flush_log()

        self._in_thread(os.fdatasync, self._wal_fd, then=flushed)

    def _checkpoint(self) -> None:
        """Copy the log into the database file, in a thread with its own connection
        (opened at the first checkpoint: an idle daemon keeps neither it nor a thread).

        PASSIVE, beside the commits, when anything was committed since the last one. But
        a log written to while it is copied can never be rewound: once it has grown past
        wal_limit, commits wait (TRUNCATING) and a TRUNCATE checkpoint copies the rest
        and empties the file. So the log never grows beyond wal_limit and one commit."""
        if self.path == MEMORY or self._checkpointing:
            return
        truncate = self._held == TRUNCATING
        if not self.file_ok:  # the file at the path is not the database kmsd writes
            return
        if not truncate and not self._commits:
            return
        try:
            checkpointer = self._checkpoint_connection()
        except sqlite3.Error as exc:
            self._checkpointed(truncate, exc)
            return
        mode = "TRUNCATE" if truncate else "PASSIVE"
        self._commits = 0
        self._checkpointing = True
        busy: list[int] = []

        def run() -> None:
            busy.append(checkpointer.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()[0])

        self._in_thread(run, then=lambda error: self._checkpointed(truncate, error, busy))

    def _checkpointed(
        self, truncated: bool, error: BaseException | None, busy: list[int] | None = None
    ) -> None:
        self._checkpointing = False
        if error is not None:
            if self.checkpoint_ok:
                log.error("checkpoints fail; the log grows until they work", error=str(error))
            self.checkpoint_ok = False
            if self._checkpointer is not None:  # opened again for the next one
                self._checkpointer.close()
                self._checkpointer = None
        elif not self.checkpoint_ok:
            log.info("checkpoints work again")
            self.checkpoint_ok = True
        if self._held != TRUNCATING:
            return
        if not truncated:  # a PASSIVE one ran when the log grew too long: now truncate
            self._checkpoint()
            return
        if error is not None or (busy and busy[0]):
            self._truncate_after = time.monotonic() + RETRY_SECONDS
            if error is None:
                log.warning(
                    "the log was not truncated: a reader of the database kept it",
                    retry_in_s=RETRY_SECONDS,
                )
        self._release()

    def _checkpoint_connection(self) -> sqlite3.Connection:
        if self._checkpointer is None:
            self._checkpointer = sqlite3.connect(
                f"file:{quote(self.path)}?mode=rw",
                uri=True,
                timeout=CHECKPOINT_BUSY,
                check_same_thread=False,
            )
        return self._checkpointer

    def _release(self) -> None:
        """Commits go on after a truncation or a recovery."""
        self._held = None
        if self._items or self._waiting is not None:
            self._schedule()

    def _wal_size(self) -> int:
        """The log's size, from a descriptor kept open on it: lseek() makes no stat_result
        (a stat per commit cost ~5k instructions)."""
        if self.path == MEMORY:
            return 0
        try:
            if self._wal_fd is None:
                self._wal_fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
            return os.lseek(self._wal_fd, 0, os.SEEK_END)
        except OSError:  # none yet, or the database is gone (the poll notices)
            return 0

    def check_access(self) -> None:
        """Check that every connection the store opens later can be opened (kmsd opened
        this one before it changed user): the checkpoints' one, checkpointing once."""
        if self.path == MEMORY:
            return
        try:
            self._checkpoint_connection().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None
            raise StoreError(
                f"{self.path}: cannot be opened by uid {os.getuid()}: {exc}. The user needs "
                "to search every directory above it and to write the directory and its files"
            ) from None

    def checks(self) -> dict[str, bool]:
        """The store's parts that work (for /readyz): commits, checkpoints, the file."""
        return {
            "last_commit_ok": self.commit_ok,
            "checkpoint_ok": self.checkpoint_ok,
            "database_file_ok": self.file_ok,
        }

    # A database file deleted under kmsd ---------------------------------------------

    def _watch_file(self) -> None:
        """Notice the database file deleted or replaced: commits would go on into a file
        nobody can open again, and be lost at the next start."""
        if self.path == MEMORY or self._held is not None:
            return
        try:
            now = _identity(self.path)
        except OSError as exc:  # cannot tell (the commits say more, if anything is wrong)
            log.debug("cannot look at the database file", error=str(exc))
            return
        if now == self._file:
            return
        if now is not None:
            if self.file_ok:
                log.error(
                    "another file took the database's place; kmsd keeps writing to the one it "
                    "opened: move the new one away (kmsd then writes its table there again), "
                    "or restart kmsd to serve from it",
                    path=self.path,
                )
            self.file_ok = False
            return
        if time.monotonic() < self._recover_after:
            return
        if self.file_ok:
            log.error(
                "the database file was deleted; writing the whole database to a new one",
                path=self.path,
            )
        self.file_ok = False
        self._held = RECOVERING
        self._recover()

    def _recover(self) -> None:
        """Copy the database, as this connection still sees it (the deleted file lives on
        while it is open), to a new file at the path, in a thread, once no checkpoint and
        no flush runs; then serve from it. Commits and admin commands wait meanwhile."""
        if self._held != RECOVERING or self._recovering:
            return
        if self._checkpointing or self._syncing:
            return  # the next poll tries again
        self._recovering = True
        temporary = f"{self.path}.new"
        opened: list[sqlite3.Connection] = []

        def copy() -> None:
            if self.settings.create_directory:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            target = sqlite3.connect(temporary)
            try:
                self.db.backup(target)
            finally:
                target.close()
            # The deleted database is closed before the copy takes its place: at close,
            # SQLite removes the -wal and -shm files of that name, if any are left.
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None
            self.db.close()
            os.replace(temporary, self.path)
            opened.append(connect(self.path, create=False, synchronous="normal"))

        self._in_thread(copy, then=lambda error: self._recovered(opened, error))

    def _recovered(self, opened: list[sqlite3.Connection], error: BaseException | None) -> None:
        self._recovering = False
        if opened:
            self.db = opened[0]
            self._file = _identity(self.path)
            try:
                self._prepare()
                self._data_version = self.db.execute("PRAGMA data_version").fetchone()[0]
            except sqlite3.Error as exc:  # the commits will tell, and be retried
                log.error("the new database file does not take writes", error=str(exc))
            self._commits += 1  # _prepare wrote to the new log
            if self._wal_fd is not None:
                os.close(self._wal_fd)  # the deleted log's
                self._wal_fd = None
            self._release_lock()
            self._lock = lock_file(self.path)
            if self._lock is None:
                log.error("another kmsd holds the lock of the new database", path=self.path)
        if error is not None and not opened:
            # Failed before the deleted database was closed, the next try copies what
            # was committed to it meanwhile; after (the copy could not be put in place or
            # opened: rare), the commits fail and kmsd needs a restart.
            self._recover_after = time.monotonic() + RETRY_SECONDS
            log.error(
                "cannot write the database to a new file",
                path=self.path,
                error=str(error),
                retry_in_s=RETRY_SECONDS,
            )
        else:
            self.file_ok = True
            log.warning("the database was written to a new file", path=self.path)
        self._release()

    def _in_thread(
        self,
        work: Callable[..., object],
        *args: Any,
        then: Callable[[BaseException | None], None],
    ) -> None:
        assert self._loop is not None
        future = self._loop.run_in_executor(None, work, *args)
        self._background.add(future)

        def done(finished: asyncio.Future[object]) -> None:
            self._background.discard(finished)
            then(None if finished.cancelled() else finished.exception())

        future.add_done_callback(done)

    # Housekeeping on the loop: admin commands, checkpoints, pruning ------------------

    def _poll(self) -> None:
        assert self._loop is not None
        self._poller = self._loop.call_later(POLL_SECONDS, self._poll)
        self._watch_file()
        self._recover()
        self._poll_commands()
        self._checkpoint()

    def _prune(self, before: float) -> int:
        """Forget the last request of clients not seen since `before` and not in the table;
        returns how many."""
        try:
            with self._transaction():
                gone: int = self.db.execute(
                    "DELETE FROM clients WHERE last_seen < ? AND (application, client) "
                    "NOT IN (SELECT application, client FROM records)",
                    (before,),
                ).rowcount
        except sqlite3.Error as exc:
            log.error("cannot prune the client history", error=str(exc))
            return 0
        return gone

    def _poll_commands(self) -> None:
        """Apply admin commands written by other processes (PRAGMA data_version changes
        only when another connection has committed)."""
        if self.path == MEMORY or self._held is not None:
            return
        try:
            current = self.db.execute("PRAGMA data_version").fetchone()[0]
            if current == self._data_version:
                return
            rows = self.db.execute(
                "SELECT id, verb, argument FROM commands WHERE done = 0 ORDER BY id"
            ).fetchall()
        except sqlite3.Error as exc:
            log.error("cannot read admin commands", error=str(exc))
            return
        self._data_version = current
        for row in rows:
            self._apply_command(*row)

    def _apply_command(self, command_id: int, verb: str, argument: str) -> None:
        """Apply a command of `kmsd forget` / `kmsd reset` to the working copy and queue
        its SQL."""
        if verb == FORGET:
            client = UUID(argument).bytes_le
            apps = self.counter.forget(client)
            for app in apps:
                self._written[app].seqs.pop(client)
            affected = len(apps)
            self._items += forget_sql(argument)
        else:
            affected = self._reset(UUID(argument).bytes_le if argument else None)
        self._items.append(
            ("UPDATE commands SET done = 1, result = ? WHERE id = ?", (affected, command_id))
        )
        log.info("admin command applied", command=verb, argument=argument, records=affected)
        self._schedule()

    def _reset(self, application: bytes | None) -> int:
        """Start one application's table (None: every table) afresh, in the working copy
        and in the database; returns the records removed."""
        removed = self.counter.reset(application)
        if application is None:
            self._written.clear()
        else:
            self._written.pop(application, None)
        self._items += reset_sql(guid_text(application) if application else "")
        return removed


# The table as other code sees it: the commands that change it, the reads ---------------

FORGET, RESET = "forget", "reset"
DAEMON_WAIT = 10.0  # seconds `change` waits for a running daemon to apply a command


def forget_sql(client: str) -> list[Statement]:
    """Take one client out of every table. Its history (last request) stays."""
    return [
        (
            "UPDATE clients SET recorded_at = NULL, seq = NULL "
            "WHERE client = ? AND recorded_at IS NOT NULL",
            (client,),
        )
    ]


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


def change(path: str, verb: str, argument: str) -> int:
    """Apply `forget` (argument: a client ID) or `reset` (argument: an application ID, ""
    for all) to a database: directly when no daemon serves from it, else through the
    daemon, so that its working copy and the file stay one. Returns the records removed."""
    db = connect(path, create=False)
    lock = lock_file(path)
    try:
        if lock is not None:  # no daemon: apply it here
            args: tuple[str, ...]
            if verb == FORGET:
                where, args, sql = "client = ?", (argument,), forget_sql(argument)
            elif argument:
                where, args, sql = "application = ?", (argument,), reset_sql(argument)
            else:
                where, args, sql = "1", (), reset_sql("")
            db.execute("BEGIN IMMEDIATE")
            removed = db.execute(f"SELECT count(*) FROM records WHERE {where}", args).fetchone()[0]
            for statement, values in sql:
                db.execute(statement, values)
            db.execute("COMMIT")
            return int(removed)
        command = db.execute(
            "INSERT INTO commands (verb, argument) VALUES (?, ?)", (verb, argument)
        ).lastrowid
        deadline = time.monotonic() + DAEMON_WAIT
        while time.monotonic() < deadline:
            row = db.execute(
                "SELECT done, result FROM commands WHERE id = ?", (command,)
            ).fetchone()
            if row[0]:
                return int(row[1])
            time.sleep(0.05)  # a CLI waiting for another process, not a test
        raise StoreError(
            f"the kmsd serving {path} did not apply the command within "
            f"{DAEMON_WAIT:.0f} s; it will when it can"
        )
    finally:
        db.close()
        if lock is not None:
            lock.close()


@dataclass(frozen=True)
class ClientRow:
    application: str
    client: str
    workstation: str
    product: str
    protocol: str
    address: str
    recorded_at: float
    expires: float
    counted: bool
    requests: int


@dataclass(frozen=True)
class AppStats:
    application: str
    count: int  # what clients are told: the clients counted, lab overrides applied
    counted: int  # clients in the table whose record still counts
    capacity: int
    thresholds: dict[int, bool]  # N-count policy seen -> reached (by `count`)
    override: str | None = None  # the lab override in force ("precharge 24"), if any


def as_reported(
    stats: list[AppStats], reported: Callable[[int], int], override: str | None
) -> list[AppStats]:
    """`stats` as clients see them: `reported` (HostPolicy.reported) turns the clients
    counted into the count they are told; thresholds are reached by that count."""
    out = []
    for s in stats:
        count = reported(s.counted)
        reached = {n: count >= n for n in s.thresholds}
        out.append(replace(s, count=count, thresholds=reached, override=override))
    return out


def app_name(app: str) -> str:
    """An application's name, or its GUID when the product database does not know it."""
    known = products().applications.get(UUID(app))
    return known.name if known else app


def resolve_app(text: str) -> str:
    """An application by name ("Windows", "Office 2013+") or GUID, as its GUID."""
    try:
        return str(products().find_application(text).id)
    except ProductNameError as exc:
        try:
            return str(UUID(text))
        except ValueError:
            raise StoreError(f"{exc} (or an application GUID)") from None


def read_clients(
    db: sqlite3.Connection, now: float, lifetime: float, application: str | None = None
) -> list[ClientRow]:
    """The records of the tables (of one application), oldest first, with what each
    client last sent."""
    rows = db.execute(
        """
        SELECT application, client, r.recorded_at, workstation, sku, kms_id, protocol,
               address, requests
        FROM records AS r JOIN clients USING (application, client)
        WHERE ?1 IS NULL OR application = ?1
        ORDER BY application, r.seq
        """,
        (application,),
    ).fetchall()
    db_products = products()
    out = []
    for app, client, recorded_at, workstation, sku, kms_id, protocol, address, requests in rows:
        product = db_products.product_name(UUID(sku), UUID(kms_id), UUID(app))
        expires = recorded_at + lifetime
        out.append(
            ClientRow(
                app_name(app),
                client,
                workstation,
                product,
                protocol,
                address,
                recorded_at,
                expires,
                expires > now,
                requests,
            )
        )
    return out


def read_override(db: sqlite3.Connection) -> tuple[int | None, int] | None:
    """(fixed count, precharge) the daemon last answered with (SqliteStore.save_override);
    None when no daemon of this version has opened the database."""
    rows = dict(db.execute("SELECT key, value FROM meta WHERE key IN (?, ?)", OVERRIDE_KEYS))
    if len(rows) != len(OVERRIDE_KEYS):
        return None
    fixed, precharge = (rows[key] for key in OVERRIDE_KEYS)
    return (int(fixed) if fixed else None), int(precharge)


def read_stats(db: sqlite3.Connection, now: float, lifetime: float) -> list[AppStats]:
    """Count, capacity and the thresholds seen (reached or not), per application."""
    out = []
    for app, capacity in db.execute("SELECT application, capacity FROM apps ORDER BY 1"):
        count = db.execute(
            "SELECT count(*) FROM records WHERE application = ? AND recorded_at > ?",
            (app, now - lifetime),
        ).fetchone()[0]
        seen = sorted(
            r[0]
            for r in db.execute(
                "SELECT DISTINCT required FROM clients WHERE application = ?", (app,)
            )
        )
        out.append(AppStats(app_name(app), count, count, capacity, {n: count >= n for n in seen}))
    return out


def _read_only(path: str, query: Callable[[sqlite3.Connection], T]) -> T:
    db = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, timeout=2.0)
    try:
        return query(db)
    finally:
        db.close()
