"""What a legitimate client sees while hostile connections hold kmsd, and what kmsd logs
meanwhile (a benchmark, not a test: it prints figures). Loopback only; every loop is bounded
in count and time. Cases (--case, default: all four):

misbehave  kmsd with room for everyone (--max-connections hostile + 500): a bounded legitimate
           load (activations/s, p50/p99) alone, then while --hostile connections from other
           loopback addresses (127.0.0.2 and up) misbehave in turns: idle after connecting,
           half a PDU and then nothing, or one byte per second (slowloris).
lockout    kmsd with its default connection limits: --idle connections from --addresses
           loopback addresses connect and say nothing (with --reconnect, each connects again
           as soon as kmsd closes it); meanwhile a legitimate client activates --legit
           times, each on a new connection as Windows does. Prints its success rate.
probes     the same idle connections, on the admin endpoint's port; meanwhile an orchestrator
           asks /healthz --legit times. Prints its success rate.
logflood   kmsd serving 127.0.0.1 only, with its default log level: --flooders connections
           at a time from 127.0.0.2 for --duration seconds, each refused. Prints kmsd's log
           lines per second and the connections refused per second.

    python bench/hostile.py --case lockout --idle 3000 --addresses 40 --legit 35
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import resource
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemon import running_kmsd  # noqa: E402
from kmsclient.activation import CallOptions, activate  # noqa: E402
from kmsclient.load import LoadReport, LoadSpec, run_load  # noqa: E402
from kmsclient.target import Target  # noqa: E402
from kmsd.protocol.client import base_request, prepare  # noqa: E402
from kmsd.protocol.kms import BaseRequest  # noqa: E402
from kmsd.protocol.products import products  # noqa: E402

SKU = products().sku_by_name("Windows Server 2022 Standard")
BIND = bytes.fromhex(
    "05000b03100000004800000002000000d016d0160000000001000000000001007521c8514e845047"
    "b0d8ec255555bc0601000000045d888aeb1cc9119fe808002b10486002000000"
)
MAX_RECONNECTS = 10_000  # per hostile connection (--reconnect), besides the time bound
CASES = ("misbehave", "lockout", "probes", "logflood")
SETTLE = 30.0  # seconds the idle connections get to open, at most, before the measurement


def make_request(protocol: int, cmid: uuid.UUID, index: int) -> BaseRequest:
    assert SKU is not None
    return base_request(SKU, major=protocol, client_machine_id=cmid)


def source_address(index: int, addresses: int) -> str:
    return f"127.0.0.{2 + index % addresses}"


async def hostile(port: int, index: int, stop: asyncio.Event) -> bool:
    """One misbehaving connection; returns whether the server closed it before `stop`."""
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(source_address(index, 200), 0)
        )
    except OSError:
        return True
    kind = index % 3
    try:
        if kind == 1:
            writer.write(BIND[:30])  # half a PDU, then nothing
        while not stop.is_set():
            if kind == 2:  # slowloris: one byte a second
                writer.write(BIND[index % len(BIND) : index % len(BIND) + 1])
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(reader.read(4096), 1.0) == b"":
                    return True
    except OSError:
        return True
    finally:
        writer.close()
    return False


async def idle(port: int, source: str, deadline: float, reconnect: bool, total: Any) -> None:
    """Connections from `source` that say nothing, one at a time, until `deadline`, counted
    in `total` (several only with `reconnect`: a new one whenever kmsd closes the last)."""
    opened = 0
    while time.monotonic() < deadline and opened < (MAX_RECONNECTS if reconnect else 1):
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0)
            )
        except OSError:
            return
        opened += 1
        total.value += 1
        try:
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    if await asyncio.wait_for(reader.read(4096), 1.0) == b"":
                        break  # closed by kmsd
        except OSError:
            pass
        finally:
            writer.close()


def attack(port: int, args: argparse.Namespace, seconds: float, opened: Any) -> None:
    """The idle connections of the lockout case, in a process of their own (so that the
    legitimate client's latency is not that of the attacker's event loop)."""

    async def run() -> None:
        deadline = time.monotonic() + seconds
        sources = [source_address(i, args.addresses) for i in range(args.idle)]
        await asyncio.gather(
            *(idle(port, source, deadline, args.reconnect, opened) for source in sources)
        )

    asyncio.run(run())


async def legit(port: int, args: argparse.Namespace) -> LoadReport:
    spec = LoadSpec(
        target=Target("127.0.0.1", port),
        protocols=(4, 5, 6),
        clients=300,
        concurrency=args.concurrency,
        duration=args.duration,
        count=args.count,
        new_connection=True,
    )
    return await run_load(spec, make_request)


def line(label: str, report: LoadReport) -> str:
    p50, p99 = report.percentile(50), report.percentile(99)
    lat = f"p50 {p50 * 1000:6.2f} ms  p99 {p99 * 1000:7.2f} ms" if p50 and p99 else "no replies"
    errors = dict(report.errors) or "none"
    return f"{label:<34} {report.rate:8.1f} act/s  {lat}  errors {errors}"


async def misbehave(port: int, args: argparse.Namespace) -> None:
    print(line("legitimate, alone", await legit(port, args)), flush=True)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(hostile(port, i, stop)) for i in range(args.hostile)]
    await asyncio.sleep(1.5)  # a benchmark, not a test: let the hostile connections settle
    print(line(f"legitimate, {args.hostile} hostile open", await legit(port, args)), flush=True)
    stop.set()
    closed = sum(await asyncio.gather(*tasks))
    print(
        f"hostile connections closed by the server: {closed} of {args.hostile} "
        f"(read timeout {args.read_timeout} s; idle ones stay until the idle timeout)"
    )


async def legitimate(port: int, args: argparse.Namespace) -> tuple[int, list[float]]:
    """--legit activations, each on a new connection; how many were answered, and when."""
    assert SKU is not None
    target, options = Target("127.0.0.1", port), CallOptions(timeout=args.timeout)
    times = []
    for _ in range(args.legit):
        result = await activate(target, prepare(base_request(SKU)), options)
        if result.verified is not None:
            times.append(result.response_time or 0.0)
    return len(times), times


async def probes(port: int, args: argparse.Namespace) -> tuple[int, list[float]]:
    """--legit health probes; how many got 200, and how fast."""
    times = []
    for _ in range(args.legit):
        start = time.perf_counter()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(args.timeout):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                answer = await reader.read()
                writer.close()
            if answer.startswith(b"HTTP/1.1 200 "):
                times.append(time.perf_counter() - start)
    return len(times), times


def under_attack(
    name: str,
    attacked: int,
    measure: Callable[[], Coroutine[Any, Any, tuple[int, list[float]]]],
    args: argparse.Namespace,
) -> None:
    """--idle connections to port `attacked` (in another process) while `measure` runs."""
    opened = multiprocessing.Value("l", 0)
    seconds = SETTLE + args.legit * (args.timeout + 1)  # the attack outlasts the measurement
    attacker = multiprocessing.Process(target=attack, args=(attacked, args, seconds, opened))
    attacker.start()
    try:
        deadline = time.monotonic() + SETTLE
        while opened.value < args.idle and time.monotonic() < deadline:
            time.sleep(0.1)  # a benchmark, not a test: wait (bounded) for the attack to open
        time.sleep(0.5)  # and for kmsd to take the last of them
        answered, times = asyncio.run(measure())
    finally:
        attacker.terminate()
        attacker.join(timeout=30)
    mode = "reconnecting when closed" if args.reconnect else "each connecting once"
    median = f"; median response {1000 * sorted(times)[len(times) // 2]:.1f} ms" if times else ""
    print(
        f"{name}: {args.idle} idle connections from {args.addresses} addresses ({mode}, "
        f"in a process of their own; {opened.value} opened in all)\n"
        f"legitimate success: {answered} of {args.legit} = {100 * answered / args.legit:.1f} % "
        f"(goal >= 95 %){median}",
        flush=True,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def flood(port: int, args: argparse.Namespace) -> int:
    """Connections from 127.0.0.2, --flooders at a time, for --duration s; returns how many."""
    deadline = time.monotonic() + args.duration
    attempts = 0

    async def one() -> None:
        nonlocal attempts
        while time.monotonic() < deadline and attempts < args.count:
            attempts += 1
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=("127.0.0.2", 0)
                )
            except OSError:
                continue
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(reader.read(1), 1.0)
            writer.close()

    await asyncio.gather(*(one() for _ in range(args.flooders)))
    return attempts


def logflood(args: argparse.Namespace) -> None:
    read_end, write_end = os.pipe()
    lines = [0]

    def count() -> None:
        with os.fdopen(read_end, "rb") as log:
            for _ in log:
                lines[0] += 1

    counter = threading.Thread(target=count, daemon=True)
    counter.start()
    with running_kmsd("--allow", "127.0.0.1/32", stderr=write_end) as kmsd:
        os.close(write_end)
        before = lines[0]
        start = time.monotonic()
        attempts = asyncio.run(flood(kmsd.port, args))
        elapsed = time.monotonic() - start
        during = lines[0] - before
    counter.join(timeout=10)
    print(
        f"logflood: {attempts} connections refused in {elapsed:.1f} s "
        f"({attempts / elapsed:.0f}/s); kmsd logged {during} lines = {during / elapsed:.1f} "
        f"lines/s (all lines of the run: {lines[0]})"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--case", choices=CASES, action="append", help="default: all")
    p.add_argument("--hostile", type=int, default=1000, help="misbehave: connections (<= 5000)")
    p.add_argument("--concurrency", type=int, default=8, help="misbehave: legitimate clients")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    p.add_argument("--count", type=int, default=20000, help="activations/connections at most")
    p.add_argument("--read-timeout", type=float, default=10.0, help="misbehave: kmsd's")
    p.add_argument("--idle", type=int, default=3000, help="lockout, probes: connections (<= 5000)")
    p.add_argument("--addresses", type=int, default=40, help="lockout, probes: source addresses")
    p.add_argument("--reconnect", action="store_true", help="lockout, probes: reconnect")
    p.add_argument("--legit", type=int, default=35, help="lockout, probes: legitimate requests")
    p.add_argument("--timeout", type=float, default=5.0, help="lockout, probes: per request, s")
    p.add_argument("--flooders", type=int, default=8, help="logflood: connections at a time")
    args = p.parse_args()
    args.hostile, args.idle = min(args.hostile, 5000), min(args.idle, 5000)
    args.addresses = max(1, min(args.addresses, 200))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max(args.hostile, args.idle) + 1024
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, need)), hard))
    cases = args.case or CASES
    if "misbehave" in cases:
        with running_kmsd(
            *("--log-level", "error", "--max-connections", str(args.hostile + 500)),
            *("--read-timeout", str(args.read_timeout)),
        ) as kmsd:
            asyncio.run(misbehave(kmsd.port, args))
    if "lockout" in cases:
        with running_kmsd("--log-level", "error") as kmsd:
            under_attack("lockout", kmsd.port, lambda: legitimate(kmsd.port, args), args)
    if "probes" in cases:
        admin = free_port()
        with running_kmsd("--log-level", "error", "--admin", f"127.0.0.1:{admin}"):
            under_attack("probes (admin port)", admin, lambda: probes(admin, args), args)
    if "logflood" in cases:
        logflood(args)
    print(f"(loopback only; {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
