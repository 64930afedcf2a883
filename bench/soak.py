"""Soak: a steady, bounded load with client churn against kmsd for a long while.

Every --sample seconds it prints the server's RSS, open file descriptors, threads, the
sizes of its database and of the database's write-ahead log (kmsd.db-wal) and the
activations so far; at the end it prints those figures at the start and at the end, and
checks the counts the host reported against its own client table (`kmsd stats`) and
against what the client side expects. kmsd runs in its default configuration (a durable
database in a temporary directory, info log to a file).

    python bench/soak.py --duration 1800 --rate 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemon import running_kmsd  # noqa: E402
from kmsclient.session import KmsConnection  # noqa: E402
from kmsd.protocol.client import base_request  # noqa: E402
from kmsd.protocol.products import products  # noqa: E402

DB = products()
SKUS = [
    DB.sku_by_name(n)
    for n in (
        "Windows 10/11 Enterprise",
        "Windows Server 2022 Standard",
        "Office LTSC Professional Plus 2021",
    )
]


MIB = 1024 * 1024


@dataclass(frozen=True)
class Sample:
    """The server's figures at one moment."""

    rss: int  # bytes
    fds: int
    threads: int
    db: int  # bytes of the database file
    wal: int  # bytes of its write-ahead log (0 when there is none)

    @classmethod
    def take(cls, pid: int, db: str) -> Sample:
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return cls(
            rss=int(fields["VmRSS"].split()[0]) * 1024,
            fds=len(os.listdir(f"/proc/{pid}/fd")),
            threads=int(fields["Threads"]),
            db=file_size(db),
            wal=file_size(f"{db}-wal"),
        )

    def line(self) -> str:
        return (
            f"RSS {self.rss / MIB:6.1f} MiB  fds {self.fds:4d}  threads {self.threads}  "
            f"DB {self.db / MIB:7.2f} MiB  WAL {self.wal / MIB:7.2f} MiB"
        )


def file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


async def soak(port: int, pid: int, db: str, args: argparse.Namespace) -> dict[str, int]:
    rng = random.Random(args.seed)
    pool = [uuid.uuid4() for _ in range(args.clients)]  # the machines of the lab
    done = errors = 0
    last_count: dict[str, int] = {}
    kept: KmsConnection | None = None
    start = time.monotonic()
    next_sample = start
    interval = 1.0 / args.rate
    first = Sample.take(pid, db)
    while (now := time.monotonic()) - start < args.duration and done < args.max_activations:
        if now >= next_sample:
            sample = Sample.take(pid, db)
            print(
                f"{now - start:7.0f} s  activations {done:8d}  errors {errors:4d}  {sample.line()}",
                flush=True,
            )
            next_sample += args.sample
        sku = rng.choice(SKUS)
        assert sku is not None
        if rng.random() < args.churn:  # a new machine replaces one of the lab's
            pool[rng.randrange(len(pool))] = uuid.uuid4()
        cmid = rng.choice(pool)
        try:
            if kept is None or rng.random() < 0.5:
                conn = await KmsConnection.open("127.0.0.1", port)
                reply = await asyncio.wait_for(
                    conn.activate(base_request(sku, client_machine_id=cmid)), 10
                )
                await conn.close()
            else:
                reply = await asyncio.wait_for(
                    kept.activate(base_request(sku, client_machine_id=cmid)), 10
                )
            if kept is None:
                kept = await KmsConnection.open("127.0.0.1", port)
            last_count[sku.kms.application.name] = reply.base.count
            done += 1
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            errors += 1
            kept = None
        await asyncio.sleep(max(0.0, start + done * interval - time.monotonic()))
    if kept is not None:
        await kept.close()
    last = Sample.take(pid, db)  # while kmsd still runs, before it closes its database
    print(f"done: {done} activations, {errors} errors in {time.monotonic() - start:.0f} s")
    print(f"start: {first.line()}")
    print(f"end:   {last.line()}")
    return last_count


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=float, default=1800.0, help="seconds (<= 4 h)")
    p.add_argument("--rate", type=float, default=200.0, help="activations per second")
    p.add_argument("--max-activations", type=int, default=2_000_000)
    p.add_argument("--clients", type=int, default=200, help="machines in the lab")
    p.add_argument(
        "--churn", type=float, default=0.05, help="chance that a request comes from a new machine"
    )
    p.add_argument("--sample", type=float, default=60.0, help="seconds between samples")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    args.duration = min(args.duration, 4 * 3600)
    with running_kmsd() as kmsd:  # the default configuration
        reported = asyncio.run(soak(kmsd.port, kmsd.process.pid, kmsd.db, args))
        stats = json.loads(
            subprocess.run(
                [sys.executable, "-m", "kmsd", "stats", "--db", kmsd.db, "--json"],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            ).stdout
        )
    server = kmsd.process
    counted = {s["application"]: s["count"] for s in stats}
    for app, count in sorted(reported.items()):
        verdict = "consistent" if counted.get(app) == count else "DIFFERENT"
        print(f"{app:<24} last reply {count:3d}  table {counted.get(app)}  {verdict}")
    print(f"kmsd exited with {server.returncode}")


if __name__ == "__main__":
    main()
