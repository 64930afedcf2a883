"""`kmsclient simulate`: a fleet scenario in virtual time, against kmsd's host logic in
this process or real kmsd daemons over loopback."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from kmsd.clock import read_clock

from ..licensing import HOUR
from ..outcome import Status, classify
from ..target import Target, loopback_only, parse_target
from . import chart, timeline
from .fleet import InProcess, Loopback, Transport, simulate, write_clock
from .scenario import Scenario, ScenarioError, load

EPILOG = """Against real daemons, start one kmsd per scenario host, each with
--clock-file PATH (the same file for all) and --db :memory: (or a fresh database), then
pass --kmsd NAME=HOST:PORT for each host and --clock-file PATH. Outages in the scenario
are simulated by the client side: a host that is down is not contacted. Exit status: 0
done, 2 usage error (a bad scenario, a non-loopback host)."""


def _mapping(text: str) -> tuple[str, Target]:
    name, sep, where = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=HOST:PORT")
    try:
        return name, parse_target(where)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(sub: Any) -> None:
    """Add the `simulate` subcommand to the subparsers `sub`."""
    p: argparse.ArgumentParser = sub.add_parser(
        "simulate",
        help="a fleet of clients over months of virtual time (scenario file)",
        description="Simulate a fleet of KMS clients (activation, renewal every 7 days, retry "
        "every 2 hours, 180-day validity, failover) on a virtual clock, against kmsd's host "
        "logic in this process (default) or real kmsd daemons over loopback (--kmsd).",
        epilog=EPILOG,
    )
    p.add_argument("scenario", type=Path, help="scenario file (TOML; see scenarios/)")
    p.add_argument(
        "--kmsd",
        type=_mapping,
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="a real kmsd (loopback only) for the scenario host NAME; repeat for each host",
    )
    p.add_argument(
        "--clock-file",
        type=Path,
        metavar="PATH",
        help="with --kmsd: the file the daemons were started with (kmsd --clock-file)",
    )
    p.add_argument(
        "--wire",
        action="store_true",
        help="in process: encode every request, answer it with KmsHost.answer and verify "
        "the reply (slower; the default calls the host's counting directly)",
    )
    p.add_argument(
        "--step",
        type=float,
        metavar="HOURS",
        help="sample period of the timeline (default: 1 hour up to 14 days, else 1 day)",
    )
    p.add_argument("--json", action="store_true", help="print JSON (kmsclient.simulate/1)")
    p.add_argument("--events", action="store_true", help="include every client's events")
    p.add_argument("--chart", type=Path, metavar="FILE.svg", help="write an SVG chart")


async def _transport(args: argparse.Namespace, scenario: Scenario) -> Transport:
    if not args.kmsd:
        return InProcess(scenario, wire=args.wire)
    scenario_hosts = [h.name for h in scenario.hosts]
    targets = dict(args.kmsd)
    missing = [h for h in scenario_hosts if h not in targets]
    unknown = [h for h in targets if h not in scenario_hosts]
    if missing or unknown:
        raise ValueError(
            f"--kmsd must name each scenario host ({', '.join(scenario_hosts)}); "
            + (f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}")
        )
    if args.clock_file is None:
        raise ValueError("--kmsd needs --clock-file (the file the daemons read their time from)")
    for target in targets.values():
        await loopback_only(target)
    return Loopback(targets, args.clock_file)


async def _unreachable(transport: Loopback) -> str | None:
    """Why a daemon cannot be reached (nothing listens, no answer), before the simulation."""
    for name, target in transport.targets.items():
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(target.host, target.port), transport.options.timeout
            )
        except (OSError, TimeoutError) as exc:
            failure = classify(exc, transport.options.timeout)
            return f"--kmsd {name}={target}: {failure.message}"
        writer.close()
    return None


async def _run(args: argparse.Namespace, scenario: Scenario, out: TextIO) -> int:
    try:
        transport = await _transport(args, scenario)
    except (ValueError, OSError) as exc:
        print(f"kmsclient simulate: error: {exc}", file=sys.stderr)
        return int(Status.USAGE)
    if isinstance(transport, Loopback):
        if (problem := await _unreachable(transport)) is not None:
            print(f"kmsclient simulate: error: {problem}", file=sys.stderr)
            return int(Status.UNREACHABLE)
        try:
            read_clock(transport.clock_file)
        except OSError:
            write_clock(transport.clock_file, scenario.start)
    step = args.step * HOUR if args.step else None
    result = await simulate(scenario, transport, keep_events=args.events, step=step)
    if args.chart is not None:
        args.chart.write_text(chart.to_svg(result), "utf-8")
    if args.json:
        print(json.dumps(timeline.to_json(result), indent=1), file=out)
    else:
        print(timeline.to_text(result), file=out)
        if result.events is not None:
            for e in result.events:
                count = "" if e.count is None else f" count {e.count}"
                print(
                    f"{timeline.at(e.offset):<12} {e.client:<16} {e.kind.value:<9} -> "
                    f"{e.state:<11} {e.host or ''}{count}",
                    file=out,
                )
    if isinstance(transport, Loopback) and transport.unreachable:
        print(
            f"kmsclient simulate: {len(transport.unreachable)} exchanges found no daemon "
            f"answering (outside the scenario's outages); first: {transport.unreachable[0]}",
            file=sys.stderr,
        )
        return int(Status.UNREACHABLE)
    return 0


def main(args: argparse.Namespace, out: TextIO) -> int:
    try:
        scenario = load(args.scenario)
    except ScenarioError as exc:
        print(f"kmsclient simulate: {exc}", file=sys.stderr)
        return int(Status.USAGE)
    if args.step is not None and not 0.01 <= args.step <= 24 * 365:
        print("kmsclient simulate: --step: between 0.01 and 8760 hours", file=sys.stderr)
        return int(Status.USAGE)
    return asyncio.run(_run(args, scenario, out))
