#!/usr/bin/env python3
"""Memory of kmsd under requests with IDs nobody sends twice.

kmsd (default configuration) gets --requests requests over --connections kept
connections, each with a random client machine ID, SKU ID and KMS ID (with --random-app,
a random application ID too). The server's RSS is printed after --baseline requests and
at the end: a server that keeps something per distinct ID grows between the two, one
whose caches and tables are bounded stays within a few MiB.

    python bench/memory.py                       # 10,000 then 100,000 requests
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemon import running_kmsd  # noqa: E402
from kmsclient.session import KmsConnection  # noqa: E402
from kmsd.protocol.client import base_request  # noqa: E402
from kmsd.protocol.kms import BaseRequest  # noqa: E402
from kmsd.protocol.products import products  # noqa: E402

MAX_REQUESTS = 1_000_000
TIMEOUT = 10.0  # seconds for one activation


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


async def drive(port: int, pid: int, args: argparse.Namespace) -> None:
    sku = products().sku_by_name("Windows 10/11 Enterprise")
    assert sku is not None
    rng = random.Random(args.seed)
    sent = errors = 0
    marks = sorted({args.baseline, args.requests})
    start = time.monotonic()

    def random_request() -> BaseRequest:
        base = base_request(sku, major=args.protocol, client_machine_id=uuid.uuid4())
        base = dataclasses.replace(
            base,
            sku_id=rng.randbytes(16),
            kms_id=rng.randbytes(16),
        )
        if args.random_app:
            base = dataclasses.replace(base, application_id=rng.randbytes(16))
        return base

    async def client(until: int) -> None:
        nonlocal sent, errors
        conn = await KmsConnection.open("127.0.0.1", port)
        try:
            while sent < until:
                sent += 1
                try:
                    await asyncio.wait_for(conn.activate(random_request()), TIMEOUT)
                except (OSError, asyncio.IncompleteReadError, TimeoutError):
                    errors += 1
                    await conn.close()
                    conn = await KmsConnection.open("127.0.0.1", port)
        finally:
            await conn.close()

    for mark in marks:
        await asyncio.gather(*(client(mark) for _ in range(args.connections)))
        rss = rss_kib(pid)
        print(
            f"after {sent:9,d} requests ({errors} errors, {time.monotonic() - start:6.1f} s): "
            f"RSS {rss / 1024:7.1f} MiB",
            flush=True,
        )
        if mark == marks[0]:
            baseline = rss
    print(f"growth from {marks[0]:,} to {sent:,} requests: {(rss - baseline) / 1024:+.1f} MiB")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--requests", type=int, default=100_000, help="requests in all")
    p.add_argument("--baseline", type=int, default=10_000, help="requests before the 1st RSS")
    p.add_argument("--connections", type=int, default=8, help="kept connections at once")
    p.add_argument("--protocol", type=int, choices=(4, 5, 6), default=4)
    p.add_argument("--random-app", action="store_true", help="random application IDs too")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    args.requests = min(args.requests, MAX_REQUESTS)
    args.baseline = min(args.baseline, args.requests)
    with running_kmsd("--log-level", "warning") as kmsd:
        asyncio.run(drive(kmsd.port, kmsd.process.pid, args))


if __name__ == "__main__":
    main()
