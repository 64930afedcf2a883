"""`kmsd journal`: the request journal of a running kmsd, read from its admin endpoint."""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO
from urllib.parse import urlencode

from .addresses import join_host_port
from .cliparser import Parser
from .tablecmd import print_table

FILTERS = ("client", "cmid", "workstation", "product", "answer", "rule")
TIMEOUT = 10.0  # seconds for the admin endpoint to answer
POLL = 1.0  # seconds between reads with --follow


def build_parser(parents: Sequence[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """`parents`: kmsd's --admin option (with --config): where the daemon's endpoint is."""
    p = Parser(
        prog="kmsd journal",
        description="Print the exchanges a running kmsd answered (its request journal), "
        "read from its admin endpoint (/api/journal), oldest first. The endpoint is the one "
        "kmsd's configuration names (--admin, KMSD_ADMIN, [network] admin).",
        parents=parents,
    )
    p.add_argument("--since", type=int, default=0, metavar="SEQ", help="only entries after SEQ")
    p.add_argument("--limit", type=int, metavar="N", help="at most N entries")
    p.add_argument("--client", metavar="ADDRESS", help="only from this address or network")
    p.add_argument("--cmid", metavar="GUID", help="only this client machine ID")
    p.add_argument("--workstation", metavar="GLOB", help="only workstations matching GLOB")
    p.add_argument("--product", metavar="TEXT", help="only products whose name contains TEXT")
    p.add_argument(
        "--answer",
        choices=("count", "hresult", "fault", "bind_nak", "close"),
        help="only exchanges answered this way",
    )
    p.add_argument("--rule", metavar="NAME", help="only exchanges a rule of this name answered")
    p.add_argument("--follow", action="store_true", help="keep printing new entries")
    p.add_argument("--json", action="store_true", help="one JSON object per entry")
    return p


def fetch(admin: tuple[str, int], query: dict[str, Any]) -> dict[str, Any]:
    """GET /api/journal; raises OSError or ValueError with what went wrong."""
    host, port = admin
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/api/journal?" + urlencode(query))
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    data = json.loads(body)
    if response.status != 200:
        raise ValueError(f"{response.status} {data.get('error', '')}".strip())
    if not isinstance(data, dict):
        raise ValueError("the admin endpoint answered something other than a journal")
    return data


def _answer(entry: dict[str, Any]) -> str:
    answer = entry["answer"]
    if answer["kind"] == "count":
        return f"count {answer['count']}"
    if "code" in answer:
        return f"{answer['kind']} {answer['name'] or answer['code']}"
    return str(answer["kind"])


def _row(entry: dict[str, Any]) -> list[str]:
    request = entry["request"] or {}
    return [
        str(entry["seq"]),
        entry["time"] or "",
        entry["peer"],
        request.get("product") or "",
        request.get("workstation") or "",
        _answer(entry),
        entry["rule"] or "",
    ]


HEADER = ["SEQ", "TIME", "CLIENT", "PRODUCT", "WORKSTATION", "ANSWER", "RULE"]


def run(args: argparse.Namespace, admin: tuple[str, int] | None, out: TextIO = sys.stdout) -> int:
    if admin is None:
        print(
            "kmsd journal: the admin endpoint is off in kmsd's configuration; "
            "name it with --admin HOST:PORT",
            file=sys.stderr,
        )
        return 2
    query: dict[str, Any] = {f: getattr(args, f) for f in FILTERS if getattr(args, f)}
    if args.limit is not None:
        query["limit"] = args.limit
    since = args.since
    where = join_host_port(*admin)
    while True:
        try:
            data = fetch(admin, {**query, "since": since})
        except (OSError, ValueError) as exc:
            print(f"kmsd journal: {where}: {exc}", file=sys.stderr)
            return 1
        entries = data["entries"]
        if args.json:
            for entry in entries:
                print(json.dumps(entry), file=out)
        elif entries or not args.follow:
            print_table([_row(e) for e in entries], HEADER, out)  # --follow: a table a batch
        out.flush()
        since = max(since, data["next"])
        if not args.follow:
            return 0
        time.sleep(POLL)
