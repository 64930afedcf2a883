"""The command line of kmsclient.discovery: `kmsclient discover`, and `kmsclient activate`
without a HOST (the KMS host found through DNS, with failover and the cached host)."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from kmsd.protocol.client import BindOptions
from kmsd.protocol.constants import SRV_SERVICE

from . import report
from .discovery import (
    QUERY_TIMEOUT,
    Candidate,
    Found,
    HostCache,
    Resolver,
    Try,
    default_state_path,
    find_host,
    order,
    parse_nameserver,
    system_config,
)
from .outcome import Status, classify
from .session import KmsConnection
from .target import Target


def _nameserver(text: str) -> tuple[str, int]:
    try:
        return parse_nameserver(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.01 <= value <= 60:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds between 0.01 and 60")
    return value


def add_dns_options(parser: argparse.ArgumentParser, *, with_state: bool) -> None:
    group = parser.add_argument_group("DNS discovery")
    if with_state:
        group.add_argument(
            "--domain",
            action="append",
            metavar="SUFFIX",
            help=f"without HOST: look for {SRV_SERVICE} SRV records under this DNS suffix "
            "(repeatable, tried in order; default: the search list of /etc/resolv.conf)",
        )
    group.add_argument(
        "--nameserver",
        type=_nameserver,
        action="append",
        metavar="IP[:PORT]",
        help="DNS server to ask (repeatable; default: those of /etc/resolv.conf)",
    )
    group.add_argument(
        "--ignore-priority",
        action="store_true",
        help="ignore SRV priority and weight: try the hosts in the order DNS gave them (vlmcs -P)",
    )
    group.add_argument(
        "--dns-timeout",
        type=_seconds,
        default=QUERY_TIMEOUT,
        help=f"seconds to wait for each DNS answer; 3 tries (default: {QUERY_TIMEOUT:g})",
    )
    if with_state:
        group.add_argument(
            "--state",
            type=Path,
            default=default_state_path(),
            metavar="FILE",
            help="where the host that answered is kept for the next activation "
            "(default: %(default)s)",
        )


def add_parser(sub: Any) -> None:
    """Add the `discover` subcommand to the subparsers `sub`."""
    p: argparse.ArgumentParser = sub.add_parser(
        "discover",
        help=f"list the KMS hosts DNS advertises ({SRV_SERVICE} SRV) and the order to try them",
        description=f"Query {SRV_SERVICE} SRV records for each DNS suffix, print them with their "
        "addresses and the RFC 2782 order a client would try them in (one random draw), "
        "and with --probe, which hosts answer an RPC bind.",
        epilog="exit status: 0 records found (with --probe: and a host answered), "
        "5 none found or none answered, 2 usage error",
    )
    p.add_argument(
        "domain",
        nargs="*",
        metavar="SUFFIX",
        help="DNS suffixes (default: the search list of /etc/resolv.conf)",
    )
    add_dns_options(p, with_state=False)
    p.add_argument("--probe", action="store_true", help="connect and bind to every address")
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=5.0,
        help="seconds for each probe's connect and bind (default: 5)",
    )
    p.add_argument("--json", action="store_true", help="print JSON for tools")


def _resolver(args: argparse.Namespace) -> tuple[Resolver, list[str]]:
    servers, search = system_config()
    domains = getattr(args, "domain", None) or search
    return Resolver(args.nameserver or servers, timeout=args.dns_timeout), domains


def _fmt(address: str, port: int) -> str:
    return str(Target(address, port))


def _discovery_json(found: Found, domains: Sequence[str]) -> dict[str, Any]:
    return {
        "domains": list(domains),
        "source": found.source,
        "attempts": [
            {
                "host": a.host,
                "address": str(a.target),
                "status": a.status.label,
                "error": a.kind,
            }
            for a in found.attempts
        ],
        "errors": found.errors,
    }


async def activate_discovered(args: argparse.Namespace, attempt: Try, out: TextIO) -> int:
    """`kmsclient activate` without a HOST."""
    resolver, domains = _resolver(args)
    if not domains:
        print(
            "kmsclient activate: error: no HOST, no --domain and no search list in "
            "/etc/resolv.conf",
            file=sys.stderr,
        )
        return int(Status.USAGE)
    cache = HostCache(args.state)
    found = await find_host(
        domains, resolver, cache, attempt, random.SystemRandom(), args.ignore_priority
    )
    result = found.result
    if args.json:
        data: dict[str, Any] = (
            report.to_json(result)
            if result is not None
            else {
                "schema": report.SCHEMA,
                "status": Status.UNREACHABLE.label,
                "exit_status": int(Status.UNREACHABLE),
                "host": None,
                "error": {"kind": "discovery", "message": "no KMS host found through DNS"},
            }
        )
        data["discovery"] = _discovery_json(found, domains)
        print(json.dumps(data, indent=1), file=out)
    else:
        lines = [f"{'Discovery':<18} {_discovery_text(found)}"]
        lines += [
            f"{'  tried':<18} {a.host} {a.target}: {a.kind}" for a in found.attempts if a.kind
        ]
        lines += [f"{'  DNS':<18} {e}" for e in found.errors]
        if result is not None:
            lines.append(report.to_text(result))
        print("\n".join(lines), file=out)
    return int(result.status) if result is not None else int(Status.UNREACHABLE)


def _discovery_text(found: Found) -> str:
    if found.answered:
        last = found.attempts[-1]
        via = "the cached host" if found.source == "cache" else f"DNS ({SRV_SERVICE} SRV)"
        return f"{last.host} {last.target} from {via}"
    return "no KMS host answered" if found.attempts else "no KMS host found through DNS"


async def _probe(address: str, port: int, timeout: float) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            conn = await KmsConnection.open(address, port, BindOptions())
    except Exception as exc:
        failure = classify(exc, timeout)
        return {"address": _fmt(address, port), "answers": False, "error": failure.message}
    conn.writer.close()
    elapsed = (time.perf_counter() - start) * 1000
    return {"address": _fmt(address, port), "answers": True, "bind_ms": round(elapsed, 3)}


async def run_discover(args: argparse.Namespace, out: TextIO) -> int:
    """`kmsclient discover`."""
    resolver, domains = _resolver(args)
    if not domains:
        print(
            "kmsclient discover: error: no SUFFIX and no search list in /etc/resolv.conf",
            file=sys.stderr,
        )
        return int(Status.USAGE)
    rng = random.SystemRandom()
    results: list[dict[str, Any]] = []
    everything: list[Candidate] = []
    for domain in domains:
        entry: dict[str, Any] = {"domain": domain, "name": f"{SRV_SERVICE}.{domain}", "records": []}
        try:
            candidates = await resolver.srv(domain)
        except Exception as exc:
            entry["error"] = str(exc)
            results.append(entry)
            continue
        everything += candidates
        entry["records"] = [
            {
                "priority": c.priority,
                "weight": c.weight,
                "port": c.record.port,
                "target": c.record.target,
                "ttl": c.record.ttl,
                "addresses": list(c.addresses),
            }
            for c in candidates
        ]
        entry["order"] = [str(c) for c in order(candidates, rng, args.ignore_priority)]
        if args.probe:
            entry["probe"] = [
                {"host": str(c), **await _probe(a, c.record.port, args.timeout)}
                for c in candidates
                for a in c.addresses
            ]
        results.append(entry)
    answering = [p for e in results for p in e.get("probe", ()) if p["answers"]]
    ok = bool(everything) and (not args.probe or bool(answering))
    if args.json:
        data = {"schema": "kmsclient.discover/1", "domains": results, "exit_status": 0 if ok else 5}
        print(json.dumps(data, indent=1), file=out)
    else:
        print("\n\n".join(_entry_text(e) for e in results), file=out)
    return 0 if ok else int(Status.UNREACHABLE)


def _entry_text(entry: dict[str, Any]) -> str:
    lines = [f"{entry['name']}"]
    if "error" in entry:
        return f"{lines[0]}: {entry['error']}"
    if not entry["records"]:
        return f"{lines[0]}: no records"
    lines.append("  priority  weight  port   target (addresses)")
    for r in entry["records"]:
        addresses = ", ".join(r["addresses"]) or "no address"
        lines.append(
            f"  {r['priority']:>8}  {r['weight']:>6}  {r['port']:<5}  {r['target']} ({addresses})"
        )
    lines.append(f"  order: {', '.join(entry['order'])}")
    for p in entry.get("probe", ()):
        verdict = f"answers (bind in {p['bind_ms']:.1f} ms)" if p["answers"] else p["error"]
        lines.append(f"  probe {p['host']} at {p['address']}: {verdict}")
    return "\n".join(lines)
