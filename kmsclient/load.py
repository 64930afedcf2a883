"""`kmsclient load`: a bounded load generator for loopback KMS hosts.

Every request is encoded (and encrypted) before the clock starts, one per simulated
client and protocol version, so the timed loop only frames PDUs and verifies replies.
A run ends at `count` attempts or after `duration` seconds, whichever comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from kmsd.protocol.checks import verify_reply
from kmsd.protocol.client import PreparedRequest, prepare
from kmsd.protocol.kms import BaseRequest

from .activation import DEFAULT_OPTIONS, Activator, CallOptions
from .outcome import Status
from .target import Target

MAX_DURATION = 3600.0  # seconds
MAX_COUNT = 10_000_000
MAX_CONCURRENCY = 1024
MAX_CLIENTS = 100_000
PROGRESS_EVERY = 0.2  # seconds between progress line updates
SEVERITY = (Status.NOT_GENUINE, Status.REFUSED, Status.UNREACHABLE)

MakeRequest = Callable[[int, uuid.UUID, int], BaseRequest]  # protocol, CMID, client index


@dataclass(frozen=True)
class LoadSpec:
    target: Target
    protocols: tuple[int, ...] = (6,)
    clients: int = 100  # distinct client machine IDs per protocol
    concurrency: int = 4
    duration: float = 10.0
    count: int = 1000
    new_connection: bool = False
    options: CallOptions = DEFAULT_OPTIONS
    verify_every: int = 1  # verify every Nth reply in full; 1: all (every reply is RPC-checked)


INTERRUPTED = 130  # the shell's status for a command ended by SIGINT


@dataclass
class LoadReport:
    spec: LoadSpec
    attempts: int = 0
    activations: int = 0  # replies that passed every check made (activated or below threshold)
    verified: int = 0  # of these, decoded and verified in full (all unless verify_every > 1)
    below_threshold: int = 0  # among the verified ones
    reconnects: int = 0
    by_protocol: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)  # vlmcs's non-fatal findings
    statuses: Counter[Status] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, successful exchanges
    elapsed: float = 0.0
    interrupted: bool = False  # stopped by Ctrl-C: the figures are those measured until then

    @property
    def status(self) -> Status:
        return next((s for s in SEVERITY if self.statuses[s]), Status.ACTIVATED)

    @property
    def rate(self) -> float:
        return self.activations / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, p: float) -> float | None:
        """Nearest-rank percentile of the latencies, in seconds."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    def to_json(self) -> dict[str, Any]:
        spec = self.spec

        def ms(p: float) -> float | None:
            value = self.percentile(p)
            return None if value is None else round(value * 1000, 3)

        return {
            "schema": "kmsclient.load/1",
            "host": str(spec.target),
            "mode": "new-connection" if spec.new_connection else "reuse",
            "protocols": list(spec.protocols),
            "clients": spec.clients,
            "concurrency": spec.concurrency,
            "attempts": self.attempts,
            "activations": self.activations,
            "verified": self.verified,
            "below_threshold": self.below_threshold,
            "by_protocol": {str(k): v for k, v in sorted(self.by_protocol.items())},
            "reconnects": self.reconnects,
            "errors": dict(self.errors.most_common()),
            "warnings": dict(self.warnings.most_common()),
            "elapsed_s": round(self.elapsed, 3),
            "activations_per_s": round(self.rate, 1),
            "latency_ms": {"p50": ms(50), "p90": ms(90), "p99": ms(99), "max": ms(100)},
            "status": self.status.label,
            "exit_status": INTERRUPTED if self.interrupted else int(self.status),
            "interrupted": self.interrupted,
        }

    def to_text(self) -> str:
        data = self.to_json()
        lat = data["latency_ms"]
        latency = (
            "n/a"
            if lat["p50"] is None
            else f"p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}  "
            f"max {lat['max']:.2f} ms"
        )
        per = ", ".join(f"V{k}: {v}" for k, v in data["by_protocol"].items()) or "none"
        lines = [
            f"Host          {data['host']} ({data['mode']}, concurrency {data['concurrency']}, "
            f"{data['clients']} clients per protocol)",
            f"Activations   {data['activations']} of {data['attempts']} attempts in "
            f"{data['elapsed_s']:.2f} s = {data['activations_per_s']:.1f}/s ({per}; "
            f"{data['below_threshold']} below threshold)",
            f"Verified      {data['verified']} in full (MAC/HMAC, hash, echoes, ePID); "
            "every reply checked at the RPC level",
            f"Latency       {latency}",
            f"Reconnects    {data['reconnects']} (host closed a kept connection)",
        ]
        if self.interrupted:
            lines.insert(0, f"Interrupted   (Ctrl-C) after {data['elapsed_s']:.2f} s: so far")
        if self.errors:
            lines.append("Errors")
            lines += [f"  {n:>8}  {kind}" for kind, n in self.errors.most_common()]
        else:
            lines.append("Errors        none")
        if self.warnings:
            lines.append("Warnings")
            lines += [f"  {n:>8}  {kind}" for kind, n in self.warnings.most_common()]
        return "\n".join(lines)


def build_pool(spec: LoadSpec, make_request: MakeRequest) -> list[PreparedRequest]:
    """`clients` distinct pre-encoded requests per protocol, interleaved by protocol."""
    pool: list[PreparedRequest] = []
    for i in range(spec.clients):
        for major in spec.protocols:
            pool.append(prepare(make_request(major, uuid.uuid4(), i)))
    return pool


class _Tickets:
    """Bounds a run in count and in time; shared by the workers of one loop."""

    def __init__(self, count: int, duration: float) -> None:
        self.count = count
        self.issued = 0
        self.deadline = time.monotonic() + duration

    def take(self) -> int | None:
        if self.issued >= self.count or time.monotonic() >= self.deadline:
            return None
        self.issued += 1
        return self.issued - 1


async def _client(
    spec: LoadSpec, pool: Sequence[PreparedRequest], tickets: _Tickets, report: LoadReport
) -> None:
    """One of the `concurrency` clients: request after request until the tickets run out.
    Every reply is checked at the RPC level (call id, context, NDR, HRESULT); every
    `verify_every`-th is decoded and verified in full (kmsd.protocol.checks.verify_reply)."""
    activator = Activator(spec.target, spec.options)
    timeout = spec.options.timeout
    new_connection = spec.new_connection
    every = spec.verify_every
    size = len(pool)
    latencies = report.latencies
    perf_counter = time.perf_counter
    try:
        while (ticket := tickets.take()) is not None:
            prepared = pool[ticket % size]
            report.attempts += 1
            start = perf_counter()
            try:
                async with asyncio.timeout(timeout):
                    payload, elapsed = await activator.call(prepared)
                conn = activator.conn
                if conn is not None and conn.rpc.warnings:
                    report.warnings.update(conn.rpc.warnings)
                if ticket % every == 0:
                    reply = verify_reply(prepared.base, prepared.iv, payload).reply
                    report.verified += 1
                    if reply.warnings:
                        report.warnings.update(reply.warnings)
                    if reply.base.count < prepared.base.required_count:
                        report.below_threshold += 1
            except Exception as exc:
                failure = activator.fail(exc)
                report.statuses[failure.status] += 1
                report.errors[failure.kind] += 1
                ok = False
            else:
                report.activations += 1
                report.by_protocol[prepared.base.major] += 1
                ok = True
            report.reconnects += activator.reconnected
            if new_connection:
                activator.abandon()
                if ok:  # a new connection's latency includes the connect and the bind
                    latencies.append(perf_counter() - start)
            elif ok:
                latencies.append(elapsed)
    finally:
        await activator.close()


async def _progress(
    report: LoadReport, spec: LoadSpec, done: asyncio.Event, out: TextIO, started: float
) -> None:
    width = 0
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), PROGRESS_EVERY)
        elapsed = time.perf_counter() - started
        share = max(report.attempts / spec.count, elapsed / spec.duration)
        bar = "#" * int(min(share, 1.0) * 20)
        line = (
            f"\r[{bar:<20}] {report.attempts}/{spec.count}  ok {report.activations}  "
            f"errors {sum(report.errors.values())}  "
            f"{report.activations / elapsed if elapsed else 0:.0f}/s  {elapsed:.1f} s"
        )
        width = max(width, len(line))
        out.write(line.ljust(width))
        out.flush()
        if done.is_set():
            out.write("\n")
            out.flush()
            return


async def run_load(
    spec: LoadSpec,
    make_request: MakeRequest,
    *,
    progress: TextIO | None = None,
    pool: Sequence[PreparedRequest] | None = None,
) -> LoadReport:
    """Run the load; `progress` (a TTY) gets a live line, rewritten with a carriage return.
    `pool`: requests encoded beforehand (then `make_request` is not called); by default
    build_pool(spec, make_request), before the clock starts."""
    if pool is None:
        pool = build_pool(spec, make_request)
    if not pool:
        raise ValueError("no requests to send")
    if spec.verify_every < 1:
        raise ValueError("verify_every must be at least 1")
    report = LoadReport(spec)
    tickets = _Tickets(spec.count, spec.duration)
    started = time.perf_counter()
    done = asyncio.Event()
    bar = (
        asyncio.create_task(_progress(report, spec, done, progress, started))
        if progress is not None
        else None
    )
    clients = [
        asyncio.create_task(_client(spec, pool, tickets, report)) for _ in range(spec.concurrency)
    ]
    # Clients stop taking tickets at the deadline; the last exchanges may take one timeout.
    try:
        _, late = await asyncio.wait(clients, timeout=spec.duration + spec.options.timeout + 1)
    except asyncio.CancelledError:  # Ctrl-C (asyncio.run cancels us): report what was measured
        current = asyncio.current_task()
        if current is None or current.uncancel() > 0:
            raise  # cancelled by something else as well
        report.interrupted = True
        late = set()
        for task in clients:
            task.cancel()
    for task in late:
        task.cancel()
        report.errors["cancelled at the hard deadline"] += 1
    outcomes = await asyncio.gather(*clients, return_exceptions=True)
    report.elapsed = time.perf_counter() - started
    if report.interrupted:  # exchanges cut short: neither answered nor failed
        cut = report.attempts - report.activations - sum(report.errors.values())
        if cut:
            report.errors["in flight at Ctrl-C"] += cut
    report.statuses[Status.ACTIVATED] += report.activations - report.below_threshold
    report.statuses[Status.BELOW_THRESHOLD] += report.below_threshold
    done.set()
    if bar is not None:
        await bar
    await asyncio.sleep(0)  # let the connections closed without waiting finish closing
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome  # a bug in the client, not something the host did
    return report


def progress_stream() -> TextIO | None:
    """stderr when it is a terminal; no progress line otherwise."""
    return sys.stderr if sys.stderr.isatty() else None
