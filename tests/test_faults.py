"""Faults at run time: the disk fills, the database turns read-only or is locked.

Defined behaviour: no reply is sent for a record that is not committed (the client sees
the connection drop and asks again later, as it would with an unreachable host), the
failure is logged, the daemon keeps accepting clients, and once the fault clears the
held-back records are committed and replies flow again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import cast

import pytest

from kmsclient.session import KmsConnection
from kmsd.host import HostIdentity, KmsHost
from kmsd.protocol.client import base_request
from kmsd.protocol.products import products
from kmsd.server import KmsServer
from kmsd.store import SqliteStore
from tests.conftest import LOOPBACK, server_settings, table_settings

DB = products()
SKU = DB.sku_by_name("Windows Server 2022 Standard")
TIMEOUT = 10.0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB file system of its own (tmpfs; needs root, as CI has)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs for the disk-full test: {result.stderr}")
        pytest.skip(f"cannot mount a tmpfs (needs root): {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


async def serve(path: Path) -> tuple[KmsServer, SqliteStore]:
    store = SqliteStore(table_settings(path), known=frozenset(DB.applications))
    identity = HostIdentity(hwid=bytes(8))
    identity.complete(DB, lambda n: bytes(n), 1_795_000_000.0)
    store.start(asyncio.get_running_loop())
    server = KmsServer(KmsHost(store, identity), server_settings(), store=store)
    await server.start()
    return server, store


@pytest.fixture
async def durable(tmp_path: Path) -> AsyncIterator[tuple[KmsServer, SqliteStore, Path]]:
    path = tmp_path / "kmsd.db"
    server, store = await serve(path)
    yield server, store, path
    await server.stop()
    await store.close()


async def activate(server: KmsServer) -> tuple[str, int | None]:
    """(client ID, count) — count None when the host gave no reply."""
    assert SKU
    base = base_request(SKU)
    conn = await KmsConnection.open(*server.addresses[0])
    try:
        reply = await asyncio.wait_for(conn.activate(base), TIMEOUT)
    except (ConnectionError, asyncio.IncompleteReadError):
        return base.cmid_text, None
    finally:
        await conn.close()
    return base.cmid_text, reply.base.count


def stored(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT client FROM records")}


async def fault_then_recover(
    durable: tuple[KmsServer, SqliteStore, Path],
    break_it: Callable[[sqlite3.Connection], object],
    mend_it: Callable[[sqlite3.Connection], object],
) -> None:
    server, store, path = durable
    first, count = await activate(server)
    assert count == 1
    break_it(store.db)
    held, count = await activate(server)
    assert count is None  # not committed, so not acknowledged
    assert store.failures >= 1
    mend_it(store.db)
    after, count = await activate(server)
    assert count == 3  # the held-back client was counted and is now on disk too
    assert stored(path) == {first, held, after}


async def test_disk_full(small_disk: Path) -> None:
    path = small_disk / "kmsd.db"
    server, store = await serve(path)
    filler = small_disk / "filler"
    try:

        def fill(db: sqlite3.Connection) -> None:
            with filler.open("wb") as out, contextlib.suppress(OSError):
                while True:
                    out.write(bytes(65536))
                    out.flush()

        await fault_then_recover((server, store, path), fill, lambda db: filler.unlink())
    finally:
        await server.stop()
        await store.close()


async def test_database_read_only(durable: tuple[KmsServer, SqliteStore, Path]) -> None:
    await fault_then_recover(
        durable,
        lambda db: db.execute("PRAGMA query_only=1"),
        lambda db: db.execute("PRAGMA query_only=0"),
    )


async def test_database_locked_by_another_process(
    durable: tuple[KmsServer, SqliteStore, Path],
) -> None:
    path = durable[2]
    blocker = sqlite3.connect(path, timeout=0)
    await fault_then_recover(
        durable,
        lambda db: blocker.execute("BEGIN EXCLUSIVE"),
        lambda db: blocker.rollback(),
    )
    blocker.close()


async def test_dns_primary_down_is_logged_and_retried_while_kmsd_serves() -> None:
    from tests.conftest import start_kmsd, stop_kmsd

    with socket.socket() as closed:  # a port nobody listens on: the primary is down
        closed.bind((LOOPBACK, 0))
        port = closed.getsockname()[1]
    kmsd = start_kmsd(
        "--publish-zone",
        "lab.test",
        "--publish-server",
        f"{LOOPBACK}:{port}",
        "--publish-address",
        LOOPBACK,
    )
    try:
        first = await asyncio.to_thread(kmsd.read_log_until, "dns update failed")
        assert SKU
        conn = await KmsConnection.open(kmsd.host, kmsd.port)
        reply = await asyncio.wait_for(conn.activate(base_request(SKU)), TIMEOUT)
        await conn.close()
        again = await asyncio.to_thread(kmsd.read_log_until, "dns update failed")
    finally:
        assert stop_kmsd(kmsd) == 0
    assert reply.base.count == 1
    assert first["server"] == f"{LOOPBACK}:{port}"
    assert cast(float, first["retry_in"]) < cast(float, again["retry_in"])
