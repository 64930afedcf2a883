"""`kmsclient` command line: activate, charge and load.

Exit statuses are those of kmsclient.outcome.Status (README.md, "kmsclient").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import Sequence
from typing import Any, TextIO

from kmsd import __version__
from kmsd.cliparser import Parser
from kmsd.eventloop import CHOICES as LOOPS
from kmsd.eventloop import run_on_loop, uvloop_installed
from kmsd.pipe import quiet_on_broken_pipe
from kmsd.protocol.client import NIL_UUID, BindOptions, base_request, prepare
from kmsd.protocol.kms import BaseRequest
from kmsd.protocol.products import ProductNameError, products
from kmsd.text import inert

from . import discovery_cli, report
from .activation import CallOptions, activate
from .charge import charge
from .load import (
    MAX_CLIENTS,
    MAX_CONCURRENCY,
    MAX_COUNT,
    MAX_DURATION,
    LoadSpec,
    progress_stream,
    run_load,
)
from .outcome import Status
from .sim import simulate
from .target import Target, loopback_only, parse_target

DEFAULT_PRODUCT = "Windows 10/11 Enterprise"
DEFAULT_TIMEOUT = 5.0
EPILOG = """exit status: 0 activated, 2 usage error, 3 below threshold (count < N policy),
4 refused by the host (HRESULT, fault or bind_nak), 5 unreachable (connection refused,
no answer within the timeout, connection closed), 6 not genuine (a reply failed
verification; the failed check is named), 1 internal error"""


def _target(text: str) -> Target:
    try:
        return parse_target(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bounded(kind: type[int] | type[float], low: float, high: float) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is outside {low:g}..{high:g}")
        return value

    return parse


def _protocols(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v not in (4, 5, 6) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a list such as 4,5,6")
    return values


def _common(parser: argparse.ArgumentParser, *, single_client: bool) -> None:
    """Options shared by every subcommand: product, protocol, RPC and request fields."""
    parser.add_argument(
        "--product",
        default=DEFAULT_PRODUCT,
        metavar="NAME|SKU-ID",
        help=f'product to activate, by name as usually written ("Windows 11 Pro", "Server 2022'
        f' Datacenter") or SKU ID; see --list-products (default: {DEFAULT_PRODUCT})',
    )
    if single_client:
        version = parser.add_mutually_exclusive_group()
        for v in (4, 5, 6):
            version.add_argument(
                f"-{v}",
                dest="major",
                action="store_const",
                const=v,
                help=f"KMS protocol V{v} (default: the product's native version)",
            )
    rpc = parser.add_argument_group("RPC")
    rpc.add_argument(
        "--ndr64",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="offer NDR64 in the bind (default: on)",
    )
    rpc.add_argument(
        "--btfn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="offer bind-time feature negotiation (default: on)",
    )
    rpc.add_argument(
        "--multiplex",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="set PFC_CONC_MPX in the bind (default: on)",
    )
    rpc.add_argument(
        "--call-syntax",
        choices=("ndr32", "ndr64"),
        default="ndr32",
        help="ndr32: first call in NDR32 on context 0, with an alter_context when the host "
        "accepted only NDR64 (what vlmcs does); ndr64: call on the NDR64 context when the "
        "host accepted it (default: ndr32)",
    )
    req = parser.add_argument_group("request")
    if single_client:
        req.add_argument("--cmid", type=uuid.UUID, help="client machine ID (default: a random one)")
    req.add_argument(
        "--previous-cmid",
        type=uuid.UUID,
        default=NIL_UUID,
        help="previous client machine ID (default: all zero)",
    )
    req.add_argument(
        "--workstation",
        default="kmsclient.lab.test",
        help="workstation name, at most 63 characters (default: kmsclient.lab.test)",
    )
    req.add_argument("--vm", action="store_true", help="claim to be a virtual machine")
    req.add_argument(
        "--license-status",
        type=_bounded(int, 0, 6),
        default=2,
        help="0 unlicensed, 1 licensed, 2 OOB grace, ... 6 extended grace (default: 2)",
    )
    req.add_argument(
        "--required-count",
        type=_bounded(int, 0, 0xFFFFFFFF),
        help="N-count policy sent to the host (default: the product's, 25 or 5)",
    )
    parser.add_argument(
        "--timeout",
        type=_bounded(float, 0.01, 600),
        default=DEFAULT_TIMEOUT,
        help=f"seconds for connect, bind and each call (default: {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--json", action="store_true", help="print JSON for tools")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="kmsclient",
        description="A KMS client: activates against, verifies and loads KMS hosts.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"kmsclient {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    act = sub.add_parser("activate", help="one verified activation exchange", epilog=EPILOG)
    act.add_argument(
        "host",
        nargs="?",
        type=_target,
        metavar="HOST[:PORT]",
        help="the KMS host; without it, found through DNS (see DNS discovery)",
    )
    act.add_argument("--list-products", action="store_true", help="list the products and exit")
    discovery_cli.add_dns_options(act, with_state=True)
    _common(act, single_client=True)

    chg = sub.add_parser(
        "charge",
        help="distinct clients until the host's count reaches the product's threshold",
        epilog=EPILOG,
    )
    chg.add_argument(
        "host", type=_target, metavar="HOST[:PORT]", help="the KMS host (port 1688 by default)"
    )
    _common(chg, single_client=True)
    chg.add_argument(
        "--max-clients",
        type=_bounded(int, 1, 1000),
        help="stop after this many clients (default: 2 x the threshold)",
    )
    chg.add_argument(
        "--stall",
        type=_bounded(int, 1, 100),
        default=3,
        help="stop when this many new clients in a row leave the count unchanged (default: 3)",
    )
    chg.add_argument(
        "--new-connection",
        action="store_true",
        help="one TCP connection per client (default: one kept connection, as vlmcs)",
    )

    load = sub.add_parser(
        "load",
        help="bounded load generator (loopback hosts only)",
        epilog="exit status: 0 when every exchange succeeded, otherwise the status of the "
        "most severe failure (6, 4, 5); 2 for a usage error or a non-loopback host",
    )
    load.add_argument(
        "host",
        type=_target,
        metavar="HOST[:PORT]",
        help="the KMS host, on a loopback address (port 1688 by default)",
    )
    _common(load, single_client=False)
    load.add_argument(
        "--protocols",
        type=_protocols,
        help="protocol mix, e.g. 4,5,6 (default: the product's native version)",
    )
    load.add_argument(
        "--clients",
        type=_bounded(int, 1, MAX_CLIENTS),
        default=100,
        help="distinct client machine IDs per protocol (default: 100)",
    )
    load.add_argument(
        "--concurrency",
        type=_bounded(int, 1, MAX_CONCURRENCY),
        default=4,
        help="requests in flight (default: 4)",
    )
    load.add_argument(
        "--duration",
        type=_bounded(float, 0.01, MAX_DURATION),
        default=10.0,
        help="stop after this many seconds (default: 10)",
    )
    load.add_argument(
        "--count",
        type=_bounded(int, 1, MAX_COUNT),
        default=1000,
        help="stop after this many requests (default: 1000)",
    )
    load.add_argument(
        "--loop",
        choices=LOOPS,
        default="auto",
        help="event loop: uvloop (faster; pip install 'kmsd[fast]'), asyncio's own, or "
        "auto: uvloop when installed (default: auto)",
    )
    mode = load.add_mutually_exclusive_group()
    mode.add_argument(
        "--new-connection",
        action="store_true",
        help="connect and bind for every request, as Windows clients do",
    )
    mode.add_argument(
        "--reuse",
        dest="new_connection",
        action="store_false",
        help="keep one connection per concurrent client (default)",
    )
    simulate.add_parser(sub)
    discovery_cli.add_parser(sub)
    return parser


def _call_options(args: argparse.Namespace) -> CallOptions:
    bind = BindOptions(ndr64=args.ndr64, btfn=args.btfn, multiplex=args.multiplex)
    return CallOptions(bind, args.call_syntax == "ndr64", args.timeout)


def _request(args: argparse.Namespace, cmid: uuid.UUID, major: int | None) -> BaseRequest:
    return base_request(
        args.product,
        major=major,
        client_machine_id=cmid,
        workstation=args.workstation,
        required_count=args.required_count,
        is_vm=int(args.vm),
        license_status=args.license_status,
        previous_client_machine_id=args.previous_cmid,
    )


def list_products(as_json: bool) -> str:
    db = products()
    rows = sorted(db.skus.values(), key=lambda s: (s.kms.application.name, s.kms.name, s.name))
    if as_json:
        return json.dumps(
            [
                {
                    "name": s.name,
                    "sku_id": str(s.id),
                    "kms_id": str(s.kms.id),
                    "kms_group": s.kms.name,
                    "application": s.kms.application.name,
                    "n_policy": s.kms.n_policy,
                    "protocol": s.kms.protocol,
                    "retail": s.kms.retail,
                    "preview": s.kms.preview,
                }
                for s in rows
            ],
            indent=1,
        )
    width = max(len(s.name) for s in rows)
    lines, group = [], None
    for s in rows:
        if s.kms is not group:
            group = s.kms
            flags = " (retail)" if group.retail else " (preview)" if group.preview else ""
            lines.append(f"{group.name}{flags}: N {group.n_policy}, V{group.protocol}")
        lines.append(f"  {s.name:<{width}}  {s.id}")
    return "\n".join(lines)


async def _activate(args: argparse.Namespace, out: TextIO) -> int:
    base = _request(args, args.cmid or uuid.uuid4(), args.major)
    prepared, options = prepare(base), _call_options(args)
    if args.host is None:
        return await discovery_cli.activate_discovered(
            args, lambda target: activate(target, prepared, options), out
        )
    result = await activate(args.host, prepared, options)
    print(
        json.dumps(report.to_json(result), indent=1) if args.json else report.to_text(result),
        file=out,
    )
    return int(result.status)


async def _charge(args: argparse.Namespace, out: TextIO) -> int:
    sample = _request(args, NIL_UUID, args.major)
    threshold = sample.required_count
    run = await charge(
        args.host,
        lambda cmid: _request(args, cmid, args.major),
        threshold,
        options=_call_options(args),
        max_clients=args.max_clients or max(1, 2 * threshold),
        stall=args.stall,
        new_connection=args.new_connection,
    )
    failure = run.last.failure if run.last is not None else None
    if args.json:
        data = {
            "schema": "kmsclient.charge/1",
            "host": str(args.host),
            "product": args.product.name,
            "threshold": threshold,
            "counts": run.counts,
            "reached": run.reached,
            "stopped": run.stopped,
            "status": run.status.label,
            "exit_status": int(run.status),
            "error": None
            if failure is None
            else {"kind": failure.kind, "message": failure.message, "check": failure.check},
        }
        print(json.dumps(data, indent=1), file=out)
    else:
        verdict = "reached" if run.reached else "not reached"
        lines = [
            f"Host       {args.host}  product {args.product.name}, threshold {threshold}",
            f"Counts     {' '.join(map(str, run.counts)) or '(none)'}",
            f"Threshold  {verdict} after {len(run.counts)} clients ({run.stopped})",
        ]
        if failure is not None:
            message = inert(failure.message)  # may quote what the host sent
            lines.append(f"Error      {run.status.label.replace('_', ' ')}: {message}")
        print("\n".join(lines), file=out)
    return int(run.status)


async def _load(args: argparse.Namespace, out: TextIO) -> int:
    try:
        await loopback_only(args.host)
    except (ValueError, OSError) as exc:
        print(f"kmsclient load: error: {exc}", file=sys.stderr)
        return int(Status.USAGE)
    spec = LoadSpec(
        args.host,
        args.protocols or (args.product.kms.protocol,),
        args.clients,
        args.concurrency,
        args.duration,
        args.count,
        args.new_connection,
        _call_options(args),
    )
    run = await run_load(
        spec,
        lambda major, cmid, i: _request(args, cmid, major),
        progress=None if args.json else progress_stream(),
    )
    data = run.to_json()
    print(json.dumps(data, indent=1) if args.json else run.to_text(), file=out)
    return int(data["exit_status"])


@quiet_on_broken_pipe
def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command line; results go to `out` (stdout), errors to stderr."""
    out = out or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "simulate":
        return simulate.main(args, out)
    if args.command == "discover":
        return asyncio.run(discovery_cli.run_discover(args, out))
    if args.command == "activate" and args.list_products:
        print(list_products(args.json), file=out)
        return 0
    try:
        args.product = products().find_sku(args.product)
    except ProductNameError as exc:  # one line, not the usage: the name is the only problem
        print(f"kmsclient {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if len(args.workstation.encode("utf-16-le")) > 126:
        parser.error("--workstation: at most 63 UTF-16 code units")
    if not args.ndr64 and args.call_syntax == "ndr64":
        parser.error("--call-syntax ndr64 needs --ndr64")
    runner = {"activate": _activate, "charge": _charge, "load": _load}[args.command]
    if args.command == "load" and args.loop == "uvloop" and not uvloop_installed():
        parser.error("--loop uvloop: uvloop is not installed")
    try:
        if args.command == "load":
            return run_on_loop(runner(args, out), args.loop)
        return asyncio.run(runner(args, out))
    except KeyboardInterrupt:
        return 130
