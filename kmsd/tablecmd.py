"""The table commands `kmsd clients`, `kmsd stats`, `kmsd forget`, `kmsd reset`: the
client table seen from outside the daemon, offline or while it runs.

They work on the database file (kmsd.store does the reading and the changing): reads see
what was committed (every acknowledged activation); changes go through the daemon when one
runs, so its working copy and the file stay one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, TextIO
from uuid import UUID

from .cache import RECORD_LIFETIME
from .config import default_path
from .store import (
    FORGET,
    RESET,
    StoreError,
    app_name,
    change,
    connect,
    read_clients,
    read_stats,
    resolve_app,
)
from .text import inert

COMMANDS = ("clients", "stats", FORGET, RESET)


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
        removed = change(args.db, FORGET, client)
        print(f"forgot {client}: {removed} record(s) removed", file=out)
        return 0
    app = resolve_app(args.app) if args.app else ""
    what = app_name(app) if app else "every application"
    if not confirm(f"Reset the client table of {what}?", args.yes):
        return 1
    removed = change(args.db, RESET, app)
    print(f"reset {what}: {removed} record(s) removed", file=out)
    return 0
