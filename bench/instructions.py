#!/usr/bin/env python3
"""Instructions per activation under callgrind: the repeatable measure on a busy machine.

Each server runs under `valgrind --tool=callgrind` (Debian: `apt-get install valgrind`; not
needed by CI). A client outside valgrind (`kmsclient load`, or vlmcs with --vlmcs) sends
activations one at a time, so the server's work is the same from run to run whatever
else the machine is doing. For every protocol version and connection mode (a cell) the
server's counters are zeroed (`callgrind_control --zero`), a burst of --small activations
is sent and the counters dumped; then the same with --large. The figure is

    (instructions of the large burst - those of the small one) / (large - small)

so start-up, the warm-up, a kept connection's connect and bind, and whatever else a burst
costs once cancel out. What the server does while idle (kmsd's store looks for admin
commands four times a second) is measured on its own for --idle seconds and subtracted in
proportion to each burst's wall time, since under valgrind a burst lasts far longer than
it would natively. The counts are user-space instructions (`Ir`) of every thread; the
kernel's work (system calls, loopback TCP) is not in them.

Forking servers (vlmcsd forks a child per connection): valgrind follows the children,
and each writes its own file when it exits. A child's file starts with the counts its
parent had at the fork; those are taken out by assuming the parent's own counts grew
evenly over the burst (the k-th of n children inherited k/n of them).

kmsd is started in its default configuration (info logging to a file, durable store in a
fresh database, uvloop when installed) unless the command says otherwise:

    python bench/instructions.py
    python bench/instructions.py --server "kmsd --log-level warning"
    python bench/instructions.py --server kmsd \\
        --server "/tmp/vlmcsd/bin/vlmcsd -D -e -L 127.0.0.1:{port}"

This is a benchmark, not a test: it prints figures (or JSON) and asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.activations import Target, make_target  # noqa: E402

MODES = ("keep", "new")


@dataclass
class ServerResult:
    label: str
    command: list[str]
    idle_per_second: int  # instructions the server runs each second while idle
    cells: list[CellResult]
    output_tail: str


@dataclass
class CellResult:
    version: int
    mode: str
    per_activation: float  # instructions
    small: int  # instructions of the small burst (idle share taken out)
    large: int
    small_seconds: float
    large_seconds: float


# ---------------------------------------------------------------------------------------
# The server under callgrind
# ---------------------------------------------------------------------------------------


def listening(port: int) -> bool:
    """A socket listens on 127.0.0.1:`port` (read from /proc, so that no probe connection
    is counted; another process may listen on the same port of another address)."""
    with contextlib.suppress(OSError), open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[1] == f"0100007F:{port:04X}":
                return True
    return False


def group_pids(pgid: int) -> set[int]:
    """Live processes of process group `pgid` (the server and its children)."""
    pids = set()
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError):
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.add(int(stat.split("/")[2]))
    return pids


def summary(path: str, timeout: float = 60.0) -> int:
    """The total of a callgrind file (its last line, so a file still being written is
    waited for)."""
    deadline = time.monotonic() + timeout
    while True:
        with open(path) as f:
            for line in f:
                if line.startswith("totals:"):
                    return int(line.split()[1])
        if time.monotonic() > deadline:
            raise SystemExit(f"{path}: no totals line after {timeout:g} s")
        time.sleep(0.1)  # valgrind is still writing it; bounded by `timeout`


class Callgrind:
    """A server command running under callgrind, its output files in a directory."""

    def __init__(self, target: Target, startup: float) -> None:
        assert target.command is not None
        self.target = target
        self.dir = tempfile.mkdtemp(prefix="kmsd-callgrind-")
        self.log = open(os.path.join(self.dir, "server.log"), "w+")  # noqa: SIM115
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.dir}/cg.%p"]
        self.proc = subprocess.Popen(
            [*argv, *target.command],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        deadline = time.monotonic() + startup
        while not listening(target.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{target.label} did not listen:\n{self.output()}")
            time.sleep(0.2)  # start-up under valgrind takes seconds; bounded by `startup`
        self.seen: set[str] = set()

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def _control(self, option: str, pids: set[int]) -> None:
        for pid in sorted(pids):
            subprocess.run(
                ["callgrind_control", option, str(pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=60,
                check=False,
            )

    def _new_files(self) -> list[str]:
        files = set(glob.glob(os.path.join(self.dir, "cg.*"))) - self.seen
        self.seen |= files
        return sorted(files)

    def zero(self) -> set[int]:
        pids = group_pids(self.pid)
        self._control("--zero", pids)
        self._new_files()
        return pids

    def collect(self, before: set[int], settle: float = 10.0) -> int:
        """Instructions since zero(): the live processes' dumps plus the files of the
        children that came and went (their inherited counts taken out)."""
        deadline = time.monotonic() + settle
        while group_pids(self.pid) - before and time.monotonic() < deadline:
            time.sleep(0.05)  # children finishing their connection; bounded by `settle`
        self._control("--dump", group_pids(self.pid) & before)
        total = 0
        parent = 0
        children: list[tuple[int, int]] = []
        for path in self._new_files():
            pid = int(os.path.basename(path).split(".")[1])
            if pid in before:
                parent += summary(path) if pid == self.pid else 0
                total += summary(path)
            else:
                children.append((pid, summary(path)))
        children.sort()
        n = len(children)
        for k, (_, count) in enumerate(children, 1):
            total += count - parent * k // n
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def cleanup(self) -> None:
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------


def client_argv(args: argparse.Namespace, port: int, version: int, mode: str, n: int) -> list[str]:
    host = f"127.0.0.1:{port}"
    if args.vlmcs:
        return [args.vlmcs, f"-{version}", "-n", str(n), *(["-T"] if mode == "new" else []), host]
    argv = [sys.executable, "-m", "kmsclient", "load", host, "--json"]
    argv += ["--protocols", str(version), "--concurrency", "1", "--count", str(n)]
    argv += ["--clients", str(n), "--duration", str(args.timeout), "--timeout", "60"]
    return [*argv, "--new-connection" if mode == "new" else "--reuse"]


def run_client(args: argparse.Namespace, port: int, version: int, mode: str, n: int) -> float:
    """Send `n` activations one at a time; returns the wall time. Exits on any failure."""
    argv = client_argv(args, port, version, mode, n)
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout, check=False)
    elapsed = time.monotonic() - started
    if args.vlmcs:
        answered = done.stdout.count("->")
        ok = done.returncode == 0 and answered == n
        problem = done.stdout[-2000:] + done.stderr[-2000:]
    else:
        report = json.loads(done.stdout) if done.stdout.startswith("{") else {}
        ok = report.get("attempts") == n and not report.get("errors")
        problem = json.dumps(report.get("errors")) if report else done.stderr[-2000:]
    if not ok:
        raise SystemExit(f"client failed: {shlex.join(argv)}\n{problem}")
    return elapsed


# ---------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, target: Target, versions: list[int]) -> ServerResult:
    server = Callgrind(target, args.startup_timeout)
    try:
        for version in versions:  # fill the client tables: later bursts evict, as in a lab
            run_client(args, target.port, version, "keep", args.warmup)
        # What the warm-up leaves to do (kmsd: a checkpoint of its commits, in a thread at
        # the next poll) is not idling: measured with it, the idle rate came out ~6 times
        # too high and took too much out of each burst, the longer one most.
        time.sleep(args.settle)
        pids = server.zero()
        time.sleep(args.idle)  # the server's own timers while nothing happens
        idle_rate = server.collect(pids) / args.idle
        cells = []
        for version in versions:
            for mode in args.modes:
                counts = []
                for n in (args.small, args.large):
                    pids = server.zero()
                    seconds = run_client(args, target.port, version, mode, n)
                    counts.append((server.collect(pids) - round(idle_rate * seconds), seconds))
                (small, t_small), (large, t_large) = counts
                per = (large - small) / (args.large - args.small)
                cells.append(CellResult(version, mode, per, small, large, t_small, t_large))
                if not args.json:
                    print(f"  {target.label}: V{version} {mode}: {per / 1000:.1f}k", flush=True)
    finally:
        server.stop()
        output = server.output()
        server.cleanup()
    return ServerResult(target.label, target.command or [], round(idle_rate), cells, output[-500:])


def print_table(results: list[ServerResult], args: argparse.Namespace) -> None:
    client = f"vlmcs ({args.vlmcs})" if args.vlmcs else "kmsclient load --concurrency 1"
    print()
    print(
        f"user-space instructions per activation (callgrind Ir), ({args.large} - {args.small}) "
        f"activations; client: {client}; kept = one connection, new = connect+bind each"
    )
    versions = sorted({c.version for r in results for c in r.cells})
    heads = [f"{m} V{v}" for m in args.modes for v in versions]
    print(f"{'server':<40}" + "".join(f"{h:>10}" for h in heads) + f"{'idle/s':>10}")
    for r in results:
        by = {(c.mode, c.version): c.per_activation for c in r.cells}
        row = "".join(f"{by[(m, v)] / 1000:>9.1f}k" for m in args.modes for v in versions)
        print(f"{r.label[:39]:<40}{row}{r.idle_per_second / 1000:>9.0f}k")
    for r in results:
        print(f"  {r.label}: {shlex.join(r.command)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--server",
        action="append",
        metavar="CMD",
        help='server command with {port}, repeatable; "kmsd [OPTIONS]" is kmsd in its default '
        "configuration plus OPTIONS (default: kmsd)",
    )
    p.add_argument("--versions", default="4,5,6", help="protocol versions (default: 4,5,6)")
    p.add_argument("--modes", default="keep,new", help="keep,new (default: both)")
    p.add_argument("--small", type=int, default=20, help="activations of the small burst")
    p.add_argument("--large", type=int, default=100, help="activations of the large burst")
    p.add_argument(
        "--warmup", type=int, default=60, help="activations per version before measuring"
    )
    p.add_argument("--idle", type=float, default=8.0, help="seconds of idle measured")
    p.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="seconds left to the server after the warm-up, before idle is measured",
    )
    p.add_argument("--vlmcs", metavar="PATH", help="use this vlmcs binary as the client")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per burst at most")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        parser.error("valgrind is not installed (Debian: apt-get install valgrind)")
    versions = [int(v) for v in args.versions.split(",")]
    args.modes = [m for m in args.modes.split(",") if m]
    if set(versions) - {4, 5, 6} or set(args.modes) - set(MODES) or not args.modes:
        parser.error("--versions takes 4,5,6 and --modes keep,new")
    if not 0 < args.small < args.large:
        parser.error("need 0 < --small < --large")
    labels: list[str] = []
    results = []
    for template in args.server or ["kmsd"]:
        target = make_target(template, labels)
        if not args.json:
            print(f"{target.label}: {shlex.join(target.command or [])}", flush=True)
        results.append(measure(args, target, versions))
    if args.json:
        servers = [asdict(r) for r in results]
        print(json.dumps({"small": args.small, "large": args.large, "servers": servers}, indent=2))
    else:
        print_table(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
