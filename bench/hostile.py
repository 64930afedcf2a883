"""What a legitimate client sees while hostile connections hold kmsd (a benchmark, not a test).

Starts a kmsd on loopback, measures a bounded legitimate load (activations/s, p50/p99),
then opens --hostile connections from other loopback addresses (127.0.0.2 and up) that
misbehave in turns: idle after connecting, half a PDU and then nothing, or one byte per
second (slowloris); and measures the same load again while they are open.

    python bench/hostile.py --hostile 1000 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemon import running_kmsd  # noqa: E402
from kmsclient.load import LoadReport, LoadSpec, run_load  # noqa: E402
from kmsclient.session import base_request  # noqa: E402
from kmsclient.target import Target  # noqa: E402
from kmsd.protocol.kms import BaseRequest  # noqa: E402
from kmsd.protocol.products import products  # noqa: E402

SKU = products().sku_by_name("Windows Server 2022 Standard")
BIND = bytes.fromhex(
    "05000b03100000004800000002000000d016d0160000000001000000000001007521c8514e845047"
    "b0d8ec255555bc0601000000045d888aeb1cc9119fe808002b10486002000000"
)


def make_request(protocol: int, cmid: uuid.UUID, index: int) -> BaseRequest:
    assert SKU is not None
    return base_request(SKU, major=protocol, client_machine_id=cmid)


async def hostile(port: int, index: int, stop: asyncio.Event) -> bool:
    """One misbehaving connection; returns whether the server closed it before `stop`."""
    source = f"127.0.0.{2 + index % 200}"
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
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


async def measure(port: int, args: argparse.Namespace) -> None:
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


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--hostile", type=int, default=1000, help="misbehaving connections (<= 5000)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    p.add_argument("--count", type=int, default=20000, help="activations per measurement at most")
    p.add_argument("--read-timeout", type=float, default=10.0)
    args = p.parse_args()
    args.hostile = min(args.hostile, 5000)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.hostile + 1024)), hard))
    with running_kmsd(
        "--log-level",
        "error",
        "--max-connections",
        str(args.hostile + 500),
        "--read-timeout",
        str(args.read_timeout),
    ) as kmsd:
        asyncio.run(measure(kmsd.port, args))
    print(f"(kmsd pid {kmsd.process.pid}, loopback only; {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
