#!/usr/bin/env python3
"""Activation throughput of a KMS host over loopback: kmsd, or any other server command.

For every protocol version (V4, V5, V6) and connection mode it drives the server with
`--concurrency` clients for `--duration` seconds or `--max-activations` activations,
whichever ends first, and prints activations/s, server CPU per activation, p50/p99
latency and the server's peak RSS.

Modes:
  keep  every client keeps one connection (one bind) and sends request after request;
  new   every activation opens a TCP connection, binds, activates and closes, as
        Windows clients do. Its latency includes the connect and the bind.

Load generator: kmsclient.load.run_load (the one behind `kmsclient load`), run in
`--workers` processes (multiprocessing, fork), each with its share of the clients on one
event loop (uvloop when installed). Each worker encodes a pool of distinct requests (one
client machine ID each) per version before any timed phase and passes it to run_load, so
the timed loop only frames PDUs; every `--verify-every`-th reply is decoded and verified in
full (kmsd.protocol.kms.decode_response), every reply is checked at the RPC level
(call id, context, HRESULT). Errors are counted by kind.

Server CPU, two methods (see bench/README.md):
  proc  utime+stime+cutime+cstime of /proc/PID/stat (all threads, and children that
        the server waited for) plus the same fields of every live descendant (walking
        /proc/*/stat by ppid), sampled before and after each cell. Exact for single-
        process servers such as kmsd and for forking servers that reap their children
        with wait(); it misses children that are reaped automatically (SIGCHLD set to
        SIG_IGN or SA_NOCLDWAIT, as vlmcsd does), whose time the kernel discards.
  perf  `perf stat -e task-clock -p PID` attached for the cell, which follows threads
        and forked children (inherit); used as a cross-check when perf is installed.

This is a benchmark, not a test: it prints figures and exits non-zero only when it
cannot run (server does not start, a worker dies), or with --fail-on-error.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import ipaddress
import itertools
import json
import math
import multiprocessing
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any, TextIO

from kmsclient.activation import CallOptions
from kmsclient.load import LoadSpec, run_load
from kmsclient.target import Target as Host
from kmsd.eventloop import run_on_loop
from kmsd.protocol.client import PreparedRequest, base_request, prepare
from kmsd.protocol.kms import BaseRequest
from kmsd.protocol.products import products

DEFAULT_SKU = "Windows 10/11 Enterprise"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# ---------------------------------------------------------------------------------------
# Load generator (runs in the worker processes)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellSpec:
    """What one worker runs for one cell."""

    host: str
    port: int
    version: int
    mode: str  # "keep" or "new"
    clients: int  # this worker's share of --concurrency
    duration: float
    quota: int  # this worker's share of --max-activations (attempts, errors included)
    verify_every: int
    op_timeout: float


@dataclass
class WorkerResult:
    ok: int = 0
    attempts: int = 0
    verified: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, successful only
    cpu: float = 0.0  # this worker's CPU seconds for the cell
    elapsed: float = 0.0


def build_pool(version: int, size: int, worker: int) -> list[PreparedRequest]:
    """`size` distinct requests (distinct client machine IDs) for protocol `version`."""
    sku = products().sku_by_name(DEFAULT_SKU)
    if sku is None:
        raise SystemExit(f"SKU {DEFAULT_SKU!r} missing from the product database")
    return [
        prepare(
            base_request(
                sku,
                major=version,
                client_machine_id=uuid.uuid4(),
                workstation=f"bench-{worker}-{i}.lab.test",
            )
        )
        for i in range(size)
    ]


def load_spec(spec: CellSpec, pool_size: int) -> LoadSpec:
    """The kmsclient.load run of one worker's share of a cell. Calls use NDR64 when the
    host accepts it (no alter_context)."""
    return LoadSpec(
        target=Host(spec.host, spec.port),
        protocols=(spec.version,),
        clients=pool_size,
        concurrency=spec.clients,
        duration=spec.duration,
        count=spec.quota,
        new_connection=spec.mode == "new",
        options=CallOptions(call_ndr64=True, timeout=spec.op_timeout),
        verify_every=spec.verify_every,
    )


def _no_request(major: int, cmid: uuid.UUID, index: int) -> BaseRequest:
    raise AssertionError("the request pool is built before the cell")


async def run_cell(spec: CellSpec, pool: list[PreparedRequest]) -> WorkerResult:
    res = WorkerResult()
    if spec.clients <= 0 or spec.quota <= 0:
        return res
    cpu0 = time.process_time()
    report = await run_load(load_spec(spec, len(pool)), _no_request, pool=pool)
    res.cpu = time.process_time() - cpu0
    res.elapsed = report.elapsed
    res.ok, res.attempts, res.verified = report.activations, report.attempts, report.verified
    res.errors, res.latencies = report.errors, report.latencies
    res.warnings = Counter({w[:70]: n for w, n in report.warnings.items()})
    return res


def worker_main(conn: Connection, index: int, versions: Sequence[int], pool_size: int) -> None:
    """Build the request pools, then run cells on command: ("cell", spec) then ("go",)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and stops us
    pools = {v: build_pool(v, pool_size, index) for v in versions}
    conn.send(("ready",))
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        spec: CellSpec = msg[1]
        if conn.recv()[0] != "go":
            return
        conn.send(("result", run_on_loop(run_cell(spec, pools[spec.version]))))


# ---------------------------------------------------------------------------------------
# Server side measurements (main process)
# ---------------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from field 3 (state) on; None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def _ticks(fields: list[str]) -> int:
    # utime, stime, cutime, cstime are fields 14-17, i.e. indexes 11-14 here
    return sum(int(x) for x in fields[11:15])


def descendants(pid: int) -> dict[int, list[str]]:
    """Live descendants of `pid` (by walking /proc/*/stat ppid links) and their stat fields."""
    children: dict[int, list[tuple[int, list[str]]]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (fields := _stat(int(name))) is not None:
            children.setdefault(int(fields[1]), []).append((int(name), fields))
    found: dict[int, list[str]] = {}
    todo = [pid]
    while todo:
        for child, fields in children.get(todo.pop(), []):
            if child not in found:
                found[child] = fields
                todo.append(child)
    return found


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU of `pid` with all its threads, its waited-for children and its live descendants."""
    own = _stat(pid)
    if own is None:
        return None
    ticks = _ticks(own) + sum(_ticks(f) for f in descendants(pid).values())
    return ticks / CLK_TCK


def peak_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def machine_cpu() -> tuple[int, int, int]:
    """(busy, stolen, total) jiffies of all CPUs from /proc/stat; stolen: time the
    hypervisor gave to other guests while this one wanted to run."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    steal = values[7] if len(values) > 7 else 0
    return sum(values) - idle, steal, sum(values)


def ignores_sigchld(pid: int) -> bool:
    """SIGCHLD set to SIG_IGN: children are reaped by the kernel and their CPU time is lost
    to /proc (it never reaches cutime/cstime)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGCHLD - 1)))
    except OSError:
        pass
    return False


def wait_children_gone(pid: int, timeout: float) -> None:
    """Give a forking server's per-connection children a moment to finish."""
    deadline = time.monotonic() + timeout
    while descendants(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


class PerfCpu:
    """`perf stat -e task-clock -p PID` for one cell: follows threads and forked children."""

    def __init__(self, pid: int) -> None:
        self.proc = subprocess.Popen(
            ["perf", "stat", "-x", ",", "-e", "task-clock", "-p", str(pid)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.15)  # let it attach before the load starts

    def stop(self) -> float | None:
        """CPU seconds counted, or None."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            return None
        return parse_perf(err)


def parse_perf(text: str) -> float | None:
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[2].startswith("task-clock"):
            try:
                return float(parts[0]) / 1000.0  # msec
            except ValueError:
                return None
    return None


def perf_available() -> bool:
    if shutil.which("perf") is None:
        return False
    try:
        probe = subprocess.run(
            ["perf", "stat", "-x", ",", "-e", "task-clock", "--", "true"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0 and parse_perf(probe.stderr) is not None


# ---------------------------------------------------------------------------------------
# Servers under test
# ---------------------------------------------------------------------------------------


@dataclass
class Target:
    label: str
    command: list[str] | None  # None: an already running server
    host: str
    port: int
    pid: int | None = None
    autoreaps: bool = False  # the server ignores SIGCHLD (see ignores_sigchld)
    proc: subprocess.Popen[bytes] | None = None
    log: TextIO | None = None


SCRATCH = tempfile.TemporaryDirectory(prefix="kmsd-bench-")  # database files, removed at exit


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_target(template: str | None, labels: list[str]) -> Target:
    port = free_port()
    if template is None or template.split()[0] == "kmsd":
        # kmsd in its default configuration (info log, here to a file; durable store, in a
        # fresh file unless the template names one; uvloop when installed) plus the
        # template's options.
        extra = shlex.split(template or "")[1:]
        argv = [sys.executable, "-m", "kmsd", "--listen", f"127.0.0.1:{port}", *extra]
        if "--db" not in extra:
            argv += ["--db", os.path.join(SCRATCH.name, f"kmsd-{port}.db")]
        label = " ".join(["kmsd", *extra])
    else:
        if "{port}" not in template:
            raise SystemExit(f"server command {template!r} has no {{port}} placeholder")
        argv = [word.replace("{port}", str(port)) for word in shlex.split(template)]
        label = os.path.basename(argv[0])
    if label in labels:
        label = f"{label}#{len(labels) + 1}"
    labels.append(label)
    return Target(label, argv, "127.0.0.1", port)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def start(target: Target, timeout: float) -> None:
    assert target.command is not None
    target.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in stop()
    target.proc = subprocess.Popen(
        target.command,
        stdin=subprocess.DEVNULL,
        stdout=target.log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # ^C in the terminal reaches us only; we stop it
    )
    target.pid = target.proc.pid
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if target.proc.poll() is not None:
            break
        if port_open(target.host, target.port):
            return
        time.sleep(0.05)
    code = target.proc.poll()
    why = f"exited with status {code}" if code is not None else f"no listener after {timeout:g} s"
    output = server_output(target)
    stop(target)
    raise SystemExit(
        f"{target.label}: {why} (expected on {target.host}:{target.port})\n"
        f"  command: {shlex.join(target.command)}\n{output}"
    )


def server_output(target: Target, limit: int = 2000) -> str:
    if target.log is None:
        return ""
    target.log.flush()
    target.log.seek(0)
    text = target.log.read()
    return text[-limit:]


def stop(target: Target) -> None:
    proc = target.proc
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    if target.log is not None:
        target.log.close()
        target.log = None


def parse_connect(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT or [::1]:PORT")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{host!r}: give a loopback IP address") from None
    if not addr.is_loopback:  # 127.0.0.0/8 or ::1
        raise argparse.ArgumentTypeError(
            f"{host}: only loopback addresses (127.0.0.0/8, ::1) may be benchmarked"
        )
    return host, int(port)


# ---------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------


@dataclass
class Cell:
    version: int
    mode: str
    activations: int
    attempts: int
    seconds: float
    rate: float
    cpu_us: float | None  # server CPU per activation: perf_cpu_us if measured, else proc_cpu_us
    proc_cpu_us: float | None  # per activation, /proc method
    perf_cpu_us: float | None  # per activation, perf method
    client_cpu_us: float  # per activation, all workers
    machine_busy: float  # share of all CPUs busy during the cell (anything running), 0-1
    machine_steal: float  # share of all CPU time stolen by the hypervisor, 0-1
    p50_ms: float | None
    p99_ms: float | None
    peak_rss_kib: int | None
    verified: int
    errors: dict[str, int]
    warnings: dict[str, int]


def percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class Workers:
    def __init__(self, count: int, versions: Sequence[int], pool_size: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.conns: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        for i in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main, args=(child, i, tuple(versions), pool_size), daemon=True
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        for conn in self.conns:
            self._recv(conn, 120)

    def _recv(self, conn: Connection, timeout: float) -> Any:
        if not conn.poll(timeout):
            raise SystemExit("a load generator worker did not answer in time")
        try:
            return conn.recv()
        except EOFError:
            raise SystemExit("a load generator worker died") from None

    def run(self, specs: list[CellSpec], target: Target, use_perf: bool) -> Cell:
        for conn, spec in zip(self.conns, specs, strict=True):
            conn.send(("cell", spec))
        pid = target.pid
        perf = PerfCpu(pid) if use_perf and pid is not None else None
        cpu0 = tree_cpu_seconds(pid) if pid is not None else None
        busy0, steal0, total0 = machine_cpu()
        t0 = time.perf_counter()
        for conn in self.conns:
            conn.send(("go",))
        spec = specs[0]
        results: list[WorkerResult] = [
            self._recv(conn, spec.duration + 2 * spec.op_timeout + 30)[1] for conn in self.conns
        ]
        wall = time.perf_counter() - t0
        busy1, steal1, total1 = machine_cpu()
        server_cpu = perf_cpu = None
        if pid is not None:
            wait_children_gone(pid, 1.0)
            cpu1 = tree_cpu_seconds(pid)
            server_cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
        if perf is not None:
            perf_cpu = perf.stop()
        ok = sum(r.ok for r in results)
        latencies = sorted(x for r in results for x in r.latencies)
        errors: Counter[str] = Counter()
        warnings: Counter[str] = Counter()
        for r in results:
            errors.update(r.errors)
            warnings.update(r.warnings)
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)

        def per_act(seconds: float | None) -> float | None:
            return seconds / ok * 1e6 if seconds is not None and ok else None

        return Cell(
            version=spec.version,
            mode=spec.mode,
            activations=ok,
            attempts=sum(r.attempts for r in results),
            seconds=wall,
            rate=ok / wall if wall > 0 else 0.0,
            cpu_us=per_act(perf_cpu if perf_cpu is not None else server_cpu),
            proc_cpu_us=per_act(server_cpu),
            perf_cpu_us=per_act(perf_cpu),
            client_cpu_us=per_act(sum(r.cpu for r in results)) or 0.0,
            machine_busy=(busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0,
            machine_steal=(steal1 - steal0) / (total1 - total0) if total1 > total0 else 0.0,
            p50_ms=p50 * 1e3 if p50 is not None else None,
            p99_ms=p99 * 1e3 if p99 is not None else None,
            peak_rss_kib=peak_rss_kib(pid) if pid is not None else None,
            verified=sum(r.verified for r in results),
            errors=dict(errors),
            warnings=dict(warnings),
        )

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def cell_specs(
    args: argparse.Namespace, target: Target, version: int, mode: str, workers: int
) -> list[CellSpec]:
    clients = split(args.concurrency, workers)
    quotas = split(args.max_activations, workers)
    return [
        CellSpec(
            host=target.host,
            port=target.port,
            version=version,
            mode=mode,
            clients=c,
            duration=args.duration,
            quota=q,
            verify_every=args.verify_every,
            op_timeout=args.timeout,
        )
        for c, q in zip(clients, quotas, strict=True)
    ]


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f} MiB"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def median_cells(runs: list[list[Cell]]) -> list[Cell]:
    """For each cell, the round whose server CPU per activation is the median (the lower
    one of an even number); a round without a CPU figure counts as the slowest."""
    chosen = []
    for same_cell in zip(*runs, strict=True):
        ordered = sorted(same_cell, key=lambda c: math.inf if c.cpu_us is None else c.cpu_us)
        chosen.append(ordered[(len(ordered) - 1) // 2])
    return chosen


def print_tables(results: list[tuple[Target, list[Cell]]], meta: dict[str, Any]) -> None:
    print(
        f"concurrency {meta['concurrency']} on {meta['workers']} load worker process(es), "
        f"{meta['cpus']} CPUs; per cell at most {meta['duration']:g} s and "
        f"{meta['max_activations']} activations; every {meta['verify_every']}th reply verified"
    )
    print(
        "kmsd runs in its default configuration plus the options shown: info log (here to a "
        f"file), durable store in a fresh database, event loop {meta['kmsd_loop']}"
    )
    if meta["rounds"] > 1:
        print(f"each cell: the round with the median srv µs/act of {meta['rounds']} rounds")
    print(
        "srv µs/act = server CPU per activation ("
        + ("perf stat task-clock, follows threads and forks" if meta["perf"] else "/proc")
        + "); proc = from /proc/PID/stat (threads, waited-for children, live descendants)"
    )
    print(
        "cli µs/act = load generator CPU per activation; busy = all CPUs of the machine "
        "(server + load generator + anything else) during the cell; steal = CPU time the "
        "hypervisor gave to other guests (above a few %, timings are not comparable)"
    )
    header = (
        f"{'ver':<4}{'mode':<6}{'act/s':>8}{'srv µs/act':>12}{'proc':>7}{'cli µs/act':>12}"
        f"{'busy':>6}{'steal':>6}{'p50 ms':>8}{'p99 ms':>8}{'peak RSS':>11}{'acts':>7}"
        f"{'errors':>7}"
    )
    for target, cells in results:
        print()
        where = shlex.join(target.command) if target.command else "already running"
        print(f"== {target.label}  (pid {target.pid or '?'}; {where})")
        if target.autoreaps:
            print(
                "   SIGCHLD ignored: its children are reaped by the kernel and the proc "
                "column misses their CPU"
            )
        print(header)
        for c in cells:
            print(
                f"V{c.version:<3}{c.mode:<6}{c.rate:>8.0f}{_f(c.cpu_us, '.0f'):>12}"
                f"{_f(c.proc_cpu_us, '.0f'):>7}{c.client_cpu_us:>12.0f}"
                f"{c.machine_busy:>6.0%}{c.machine_steal:>6.0%}{_f(c.p50_ms, '.2f'):>8}"
                f"{_f(c.p99_ms, '.2f'):>8}{_mib(c.peak_rss_kib):>11}{c.activations:>7}"
                f"{sum(c.errors.values()):>7}"
            )
        for c in cells:
            for kind, n in sorted(c.errors.items()):
                print(f"  V{c.version} {c.mode}: {n} x error {kind}")
            for kind, n in sorted(c.warnings.items()):
                print(f"  V{c.version} {c.mode}: {n} x warning {kind}")
    if len(results) > 1:
        first, base_cells = results[0]
        for target, cells in results[1:]:
            print()
            print(f"== {target.label} / {first.label}")
            print(f"{'ver':<4}{'mode':<6}{'act/s':>8}{'srv µs/act':>12}{'p50':>8}{'p99':>8}")
            for b, c in zip(base_cells, cells, strict=True):
                print(
                    f"V{c.version:<3}{c.mode:<6}{_ratio(c.rate, b.rate):>8}"
                    f"{_ratio(c.cpu_us, b.cpu_us):>12}"
                    f"{_ratio(c.p50_ms, b.p50_ms):>8}{_ratio(c.p99_ms, b.p99_ms):>8}"
                )


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def _list(kind: str, allowed: Sequence[str]) -> Any:
    def convert(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{kind}: choose from {','.join(allowed)}")
        return list(dict.fromkeys(items))

    return convert


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="KMS activation benchmark over loopback (see bench/README.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    srv = p.add_argument_group("server under test (default: start python -m kmsd)")
    srv.add_argument(
        "--server-cmd",
        metavar="CMD",
        help="command that starts a server on 127.0.0.1:{port}, e.g. "
        '"/tmp/vlmcsd/bin/vlmcsd -D -e -L 127.0.0.1:{port}"',
    )
    srv.add_argument(
        "--compare",
        metavar="CMD",
        action="append",
        default=[],
        help="another server command with {port}, run after the first; repeatable; "
        'ratios are printed against the first. "kmsd [OPTIONS]" stands for the default kmsd',
    )
    srv.add_argument(
        "--connect",
        metavar="HOST:PORT",
        type=parse_connect,
        help="measure an already running server (loopback only) instead of starting one",
    )
    srv.add_argument("--pid", type=int, help="its process id, for CPU and RSS figures")
    srv.add_argument(
        "--startup-timeout", type=float, default=15.0, help="seconds to wait for the port"
    )
    load = p.add_argument_group("load")
    load.add_argument("--concurrency", type=int, default=8, help="clients at once")
    load.add_argument(
        "--workers",
        type=int,
        help="load generator processes (default: min(CPUs, concurrency))",
    )
    load.add_argument("--duration", type=float, default=3.0, help="seconds per cell at most")
    load.add_argument(
        "--max-activations", type=int, default=20000, help="activation attempts per cell at most"
    )
    load.add_argument(
        "--versions", type=_list("versions", ("4", "5", "6")), default=["4", "5", "6"]
    )
    load.add_argument("--modes", type=_list("modes", ("keep", "new")), default=["keep", "new"])
    load.add_argument(
        "--verify-every",
        type=int,
        default=16,
        metavar="N",
        help="fully decode and verify every Nth reply (1: all)",
    )
    load.add_argument(
        "--pool", type=int, default=256, help="distinct pre-encoded requests per worker and version"
    )
    load.add_argument("--timeout", type=float, default=5.0, help="seconds per operation at most")
    load.add_argument(
        "--warmup", type=int, default=50, help="untimed activations per version before the cells"
    )
    load.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every server this many times, in turn (A B A B ...), and report for each "
        "cell the round with the median server CPU: steadier figures on a noisy machine",
    )
    load.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 0.5 s and at most 300 activations per cell, small pools",
    )
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON document instead")
    out.add_argument("--no-perf", dest="perf", action="store_false", help="skip perf stat")
    out.add_argument("--fail-on-error", action="store_true", help="exit 1 if any activation failed")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = min(args.duration, 0.5)
        args.max_activations = min(args.max_activations, 300)
        args.pool = min(args.pool, 32)
        args.warmup = min(args.warmup, 10)
    for name in (
        "concurrency",
        "duration",
        "max_activations",
        "verify_every",
        "pool",
        "timeout",
        "rounds",
    ):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be greater than 0")
    if args.pid is not None and args.connect is None:
        parser.error("--pid needs --connect HOST:PORT")
    if args.connect is not None and args.server_cmd is not None:
        parser.error("--connect and --server-cmd exclude each other")
    if args.pid is not None and _stat(args.pid) is None:
        parser.error(f"--pid {args.pid}: no such process")
    versions = [int(v) for v in args.versions]
    workers_n = max(1, min(args.workers or os.cpu_count() or 1, args.concurrency))
    pool_size = max(1, min(args.pool, math.ceil(args.max_activations / workers_n)))
    use_perf = args.perf and perf_available()

    labels: list[str] = []
    targets: list[Target] = []
    if args.connect is not None:
        host, port = args.connect
        labels.append("server")
        targets.append(Target("server", None, host, port, pid=args.pid))
    else:
        targets.append(make_target(args.server_cmd, labels))
    for template in args.compare:
        targets.append(make_target(template, labels))

    meta: dict[str, Any] = {
        "concurrency": args.concurrency,
        "workers": workers_n,
        "duration": args.duration,
        "max_activations": args.max_activations,
        "verify_every": args.verify_every,
        "pool": pool_size,
        "perf": use_perf,
        "cpu_method": "proc: delta of utime+stime+cutime+cstime of /proc/PID/stat plus "
        "live descendants (ppid walk of /proc/*/stat); perf: perf stat -e task-clock -p PID",
        "cpus": os.cpu_count(),
        "kmsd_loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
    }
    meta["rounds"] = args.rounds
    workers = Workers(workers_n, versions, pool_size)
    rounds: list[list[list[Cell]]] = [[] for _ in targets]  # per target, per round
    try:
        for _, (index, target) in itertools.product(range(args.rounds), enumerate(targets)):
            if target.command is not None:
                start(target, args.startup_timeout)
            elif not port_open(target.host, target.port):
                raise SystemExit(f"nothing accepts connections on {target.host}:{target.port}")
            if target.pid is not None:
                target.autoreaps = ignores_sigchld(target.pid)
            try:
                warm = argparse.Namespace(**{**vars(args), "max_activations": args.warmup})
                for version in versions:
                    if args.warmup > 0:
                        warm_specs = cell_specs(warm, target, version, "keep", workers_n)
                        workers.run(warm_specs, target, use_perf=False)
                cells = [
                    workers.run(
                        cell_specs(args, target, version, mode, workers_n), target, use_perf
                    )
                    for version in versions
                    for mode in args.modes
                ]
                if target.proc is not None and target.proc.poll() is not None:
                    print(f"warning: {target.label} exited during the run", file=sys.stderr)
                    print(server_output(target), file=sys.stderr)
            finally:
                stop(target)
            rounds[index].append(cells)
    finally:
        workers.close()
        for target in targets:
            stop(target)

    results = [(target, median_cells(runs)) for target, runs in zip(targets, rounds, strict=True)]
    if args.json:
        doc = {
            "config": meta,
            "servers": [
                {
                    "label": t.label,
                    "command": t.command,
                    "pid": t.pid,
                    "ignores_sigchld": t.autoreaps,
                    "cells": [asdict(c) for c in cells],
                }
                for t, cells in results
            ],
        }
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print_tables(results, meta)
    failed = any(c.errors for _, cells in results for c in cells)
    return 1 if args.fail_on_error and failed else 0


if __name__ == "__main__":
    sys.exit(main())
