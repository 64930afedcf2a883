#!/usr/bin/env python3
"""The size of kmsd's write-ahead log under load at full speed.

For kept connections and for a new connection per activation, kmsd (default
configuration, plus --kmsd-args) gets `kmsclient load` at full speed for --duration
seconds; every --sample seconds the size of kmsd.db-wal is read. Printed per mode:
activations/s, p99 latency, the log's peak and final size, and the database's size.

    python bench/wal.py                          # 60 s per mode
    python bench/wal.py --kmsd-args="--wal-limit 4096"   # the cost of the bound
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemon import running_kmsd  # noqa: E402

MAX_DURATION = 3600.0
MIB = 2**20


def size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def run(mode: str, args: argparse.Namespace) -> None:
    with running_kmsd("--log-level", "warning", *shlex.split(args.kmsd_args)) as kmsd:
        wal = f"{kmsd.db}-wal"
        peak = 0
        done = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not done.wait(args.sample):
                peak = max(peak, size(wal))

        watcher = threading.Thread(target=watch)
        watcher.start()
        load = [
            sys.executable,
            "-m",
            "kmsclient",
            "load",
            f"127.0.0.1:{kmsd.port}",
            "--json",
            "--duration",
            str(args.duration),
            "--count",
            "10000000",
            "--concurrency",
            str(args.concurrency),
            "--clients",
            str(args.clients),
            "--new-connection" if mode == "new" else "--reuse",
        ]
        try:
            result = subprocess.run(
                load, capture_output=True, text=True, cwd=ROOT, timeout=args.duration + 60
            )
        finally:
            done.set()
            watcher.join()
        peak = max(peak, size(wal))
        report = json.loads(result.stdout)
        print(
            f"{mode:4}  {report['activations_per_s']:7.0f} activations/s  "
            f"p99 {report['latency_ms']['p99']} ms  errors {report['errors'] or 0}  "
            f"log peak {peak / MIB:7.1f} MiB, at the end {size(wal) / MIB:6.1f} MiB  "
            f"database {size(kmsd.db) / MIB:5.1f} MiB",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=float, default=60.0, help="seconds per mode")
    p.add_argument("--modes", default="keep,new", help="keep, new or both (default)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    p.add_argument("--clients", type=int, default=10_000, help="distinct client IDs")
    p.add_argument("--sample", type=float, default=0.01, help="seconds between samples")
    p.add_argument("--kmsd-args", default="", help="more kmsd options, as one string")
    args = p.parse_args()
    args.duration = min(args.duration, MAX_DURATION)
    for mode in args.modes.split(","):
        run(mode, args)


if __name__ == "__main__":
    main()
