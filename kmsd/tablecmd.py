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
from dataclasses import asdict, replace
from typing import Any, TextIO
from uuid import UUID

from .cliparser import Parser
from .host import HostPolicy
from .store import (
    FORGET,
    RESET,
    StoreError,
    StoreSettings,
    app_name,
    as_reported,
    change,
    connect,
    read_clients,
    read_override,
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


HELP = {
    "clients": "list the client table: each client's ID, workstation, product, last request "
    "and expiry, and whether it counts",
    "stats": "count, capacity and thresholds reached per application",
    FORGET: "take one client out of the table (its last request stays in the history)",
    RESET: "empty the table (of one application) and its capacity",
}


def build_parser(
    command: str, parents: Sequence[argparse.ArgumentParser] = ()
) -> argparse.ArgumentParser:
    """The command line of one table command; `parents`: the kmsd options it takes (the
    database and the record lifetime, read as the daemon reads them)."""
    p = Parser(
        prog=f"kmsd {command}",
        description=f"{HELP[command][0].upper()}{HELP[command][1:]}. Safe while kmsd runs: "
        "reads see every acknowledged activation, and changes go through the daemon.",
        parents=parents,
    )
    if command in ("clients", RESET):
        p.add_argument("--app", metavar="NAME", help="only this application (name or GUID)")
    if command in ("clients", "stats"):
        p.add_argument("--json", action="store_true", help="JSON instead of a table")
    if command == FORGET:
        p.add_argument("client", metavar="CLIENT_ID", help="client machine ID (GUID)")
    if command in (FORGET, RESET):
        p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    return p


def run(
    command: str,
    args: argparse.Namespace,
    table: StoreSettings,
    policy: HostPolicy = HostPolicy(),
    out: TextIO = sys.stdout,
) -> int:
    """Run a table command on the database of `table`; the exit status. `policy`: the
    daemon's, whose lab overrides `stats` applies to show the count clients are told."""
    try:
        return _run(command, args, table, policy, out)
    except StoreError as exc:
        print(f"kmsd {command}: {exc}", file=sys.stderr)
        return 1


def _run(
    command: str, args: argparse.Namespace, table: StoreSettings, policy: HostPolicy, out: TextIO
) -> int:
    now, lifetime = time.time(), table.lifetime
    if command in ("clients", "stats"):
        db = connect(table.path, create=False)
        try:
            if command == "clients":
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
                counted = read_stats(db, now, lifetime)
                if (recorded := read_override(db)) is not None:  # what the daemon answers with
                    fixed_count, precharge = recorded
                    policy = replace(policy, fixed_count=fixed_count, precharge=precharge)
                stats = as_reported(counted, policy.reported, policy.override)
                header = ["APPLICATION", "COUNT", "COUNTED", "CAPACITY", "THRESHOLDS"]
                cells = [
                    [
                        r.application,
                        str(r.count),
                        str(r.counted),
                        str(r.capacity),
                        ", ".join(
                            f"{n}: {'reached' if ok else 'not reached'}"
                            for n, ok in r.thresholds.items()
                        ),
                    ]
                    for r in stats
                ]
                emit(stats, header, cells, args.json, out)
                if policy.override and not args.json:
                    print(
                        f"lab override {policy.override}: COUNT is what clients are told, "
                        "COUNTED the clients in the table",
                        file=out,
                    )
        finally:
            db.close()
        return 0
    if command == FORGET:
        try:
            client = str(UUID(args.client))
        except ValueError:
            raise StoreError(f"{args.client!r} is not a client machine ID (GUID)") from None
        if not confirm(f"Forget client {client}?", args.yes):
            return 1
        removed = change(table.path, FORGET, client)
        print(f"forgot {client}: {removed} record(s) removed", file=out)
        return 0
    app = resolve_app(args.app) if args.app else ""
    what = app_name(app) if app else "every application"
    if not confirm(f"Reset the client table of {what}?", args.yes):
        return 1
    removed = change(table.path, RESET, app)
    print(f"reset {what}: {removed} record(s) removed", file=out)
    return 0
