"""`kmsd clients`, `kmsd stats`, `kmsd forget`, `kmsd reset`: the table, seen from outside.

They work on the database file, also while a daemon serves from it: reads see what was
committed (every acknowledged activation); changes go through the daemon when one runs,
so its working copy and the file stay one.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, TextIO
from uuid import UUID

from .cache import RECORD_LIFETIME
from .protocol.products import products
from .store import StoreError, connect, default_path, lock_file, reset_sql
from .text import inert

COMMANDS = ("clients", "stats", "forget", "reset")
DAEMON_WAIT = 10.0  # seconds to wait for a running daemon to apply a command


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
    count: int
    capacity: int
    thresholds: dict[int, bool]  # N-count policy seen -> reached


def app_name(app: str) -> str:
    known = products().applications.get(UUID(app))
    return known.name if known else app


def resolve_app(text: str) -> str:
    """An application by name ("Windows", "Office 2013 and later") or GUID."""
    for app in products().applications.values():
        if app.name.casefold() == text.casefold():
            return str(app.id)
    try:
        return str(UUID(text))
    except ValueError:
        names = ", ".join(a.name for a in products().applications.values())
        raise StoreError(f"unknown application {text!r} (known: {names}, or a GUID)") from None


def read_clients(
    db: sqlite3.Connection, now: float, lifetime: float, application: str | None = None
) -> list[ClientRow]:
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


def read_stats(db: sqlite3.Connection, now: float, lifetime: float) -> list[AppStats]:
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
        out.append(AppStats(app_name(app), count, capacity, {n: count >= n for n in seen}))
    return out


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))


def print_table(rows: list[list[str]], header: list[str], out: TextIO) -> None:
    rows = [[inert(cell) for cell in row] for row in rows]  # workstation names come from clients
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out
        )


def emit(
    rows: Sequence[Any], header: list[str], cells: list[list[str]], as_json: bool, out: TextIO
) -> None:
    """Rows (dataclasses) as JSON, or their cells as an aligned table."""
    if as_json:
        json.dump([asdict(r) for r in rows], out, indent=1)
        print(file=out)
    else:
        print_table(cells, header, out)


def confirm(question: str, assume_yes: bool) -> bool:
    if assume_yes:
        return True
    if not sys.stdin.isatty():
        raise StoreError(f"{question} Refusing without a terminal to ask; add --yes.")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def change(path: str, verb: str, argument: str) -> int:
    """Apply forget/reset: directly when no daemon runs, else through the daemon.
    Returns the number of records removed."""
    db = connect(path, create=False)
    lock = lock_file(path)
    try:
        if lock is not None:  # no daemon: apply it here
            db.execute("BEGIN IMMEDIATE")
            if verb == "forget":
                removed = db.execute(
                    "SELECT count(*) FROM records WHERE client = ?", (argument,)
                ).fetchone()[0]
                db.execute(
                    "UPDATE clients SET recorded_at = NULL, seq = NULL "
                    "WHERE client = ? AND recorded_at IS NOT NULL",
                    (argument,),
                )
            else:
                where = "WHERE application = ?" if argument else ""
                removed = db.execute(
                    f"SELECT count(*) FROM records {where}", (argument,) if argument else ()
                ).fetchone()[0]
                for statement, args in reset_sql(argument):
                    db.execute(statement, args)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kmsd",
        description="Look at and manage kmsd's client table (safe while the daemon runs).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db",
        metavar="PATH",
        default=str(default_path()),
        help="the database (default: %(default)s)",
    )
    common.add_argument(
        "--record-lifetime",
        metavar="DAYS",
        type=float,
        default=RECORD_LIFETIME / 86400,
        help="record lifetime the daemon uses (default: %(default)g)",
    )
    clients = sub.add_parser("clients", parents=[common], help="list the client table")
    clients.add_argument("--app", help="only this application (name or GUID)")
    clients.add_argument("--json", action="store_true", help="JSON instead of a table")
    stats = sub.add_parser("stats", parents=[common], help="count and capacity per application")
    stats.add_argument("--json", action="store_true", help="JSON instead of a table")
    forget = sub.add_parser("forget", parents=[common], help="remove one client from the table")
    forget.add_argument("client", metavar="CLIENT_ID", help="client machine ID (GUID)")
    forget.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    reset = sub.add_parser(
        "reset", parents=[common], help="empty the table (of one application) and its capacity"
    )
    reset.add_argument("--app", help="only this application (name or GUID)")
    reset.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    return p


def main(argv: Sequence[str], out: TextIO = sys.stdout) -> int:
    args = build_parser().parse_args(argv)
    lifetime = args.record_lifetime * 86400
    try:
        return _run(args, lifetime, out)
    except StoreError as exc:
        print(f"kmsd {args.command}: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, lifetime: float, out: TextIO) -> int:
    now = time.time()
    if args.command in ("clients", "stats"):
        db = connect(args.db, create=False)
        try:
            if args.command == "clients":
                app = resolve_app(args.app) if args.app else None
                clients = read_clients(db, now, lifetime, app)
                header = [
                    "APPLICATION",
                    "CLIENT ID",
                    "WORKSTATION",
                    "PRODUCT",
                    "LAST REQUEST",
                    "EXPIRES",
                    "COUNTED",
                ]
                cells = [
                    [
                        r.application,
                        r.client,
                        r.workstation,
                        r.product,
                        _when(r.recorded_at),
                        _when(r.expires),
                        "yes" if r.counted else "no",
                    ]
                    for r in clients
                ]
                emit(clients, header, cells, args.json, out)
            else:
                stats = read_stats(db, now, lifetime)
                header = ["APPLICATION", "COUNT", "CAPACITY", "THRESHOLDS"]
                cells = [
                    [
                        r.application,
                        str(r.count),
                        str(r.capacity),
                        ", ".join(
                            f"{n}: {'reached' if ok else 'not reached'}"
                            for n, ok in r.thresholds.items()
                        ),
                    ]
                    for r in stats
                ]
                emit(stats, header, cells, args.json, out)
        finally:
            db.close()
        return 0
    if args.command == "forget":
        try:
            client = str(UUID(args.client))
        except ValueError:
            raise StoreError(f"{args.client!r} is not a client machine ID (GUID)") from None
        if not confirm(f"Forget client {client}?", args.yes):
            return 1
        removed = change(args.db, "forget", client)
        print(f"forgot {client}: {removed} record(s) removed", file=out)
        return 0
    app = resolve_app(args.app) if args.app else ""
    what = app_name(app) if app else "every application"
    if not confirm(f"Reset the client table of {what}?", args.yes):
        return 1
    removed = change(args.db, "reset", app)
    print(f"reset {what}: {removed} record(s) removed", file=out)
    return 0
