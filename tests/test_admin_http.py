"""The admin endpoint: metrics after known activations, probes, the JSON API against the
CLI, HTTP edge cases, and the status page in a real headless browser (Debian chromium)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kmsclient.session import KmsConnection
from kmsd import web
from kmsd.config import defaults
from kmsd.host import HostIdentity, HostPolicy, KmsHost
from kmsd.limits import Admission
from kmsd.metrics import Metrics
from kmsd.protocol.client import HostRefused, base_request
from kmsd.protocol.kms import BaseRequest
from kmsd.protocol.products import products
from kmsd.protocol.rpc import DREP_LE, HEADER
from kmsd.server import KmsServer
from kmsd.store import MEMORY, SqliteStore
from kmsd.text import UNSAFE, inert
from tests.cdp import Browser
from tests.conftest import (
    LOOPBACK,
    KmsdProcess,
    run_kmsd,
    server_settings,
    start_kmsd,
    stop_kmsd,
    table_settings,
)

DB = products()
WIN = DB.sku_by_name("Windows 10/11 Enterprise")
OFFICE = DB.sku_by_name("Office LTSC Professional Plus 2021")
TIMEOUT = 10.0
CHROMIUM = shutil.which("chromium")


@dataclasses.dataclass
class Served:
    kms: KmsServer
    store: SqliteStore
    admin: web.AdminServer
    path: str

    @property
    def kms_address(self) -> tuple[str, int]:
        return self.kms.addresses[0]

    @property
    def address(self) -> tuple[str, int]:
        assert self.admin.address is not None
        return self.admin.address


async def serve(path: str, policy: HostPolicy = HostPolicy()) -> Served:
    store = SqliteStore(table_settings(path), known=frozenset(DB.applications))
    identity = HostIdentity(hwid=bytes.fromhex("0123456789abcdef"))
    identity.complete(DB, os.urandom, time.time())
    host = KmsHost(store, identity, policy)
    store.start(asyncio.get_running_loop())
    kms = KmsServer(host, server_settings(), store=store)
    await kms.start()
    admin = await web.start((LOOPBACK, 0), kms, store)
    return Served(kms, store, admin, path)


async def shut(served: Served) -> None:
    await served.admin.stop()
    await served.kms.stop()
    await served.store.close()
    await served.kms.drained()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """kmsd with a database file and its admin endpoint, in the test's loop."""
    s = await serve(str(tmp_path / "kmsd.db"))
    yield s
    await shut(s)


async def http(
    address: tuple[str, int], path: str = "/", *, method: str = "GET", raw: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP exchange over a raw socket: status, headers (lower-case names), body."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        host = f"{address[0]}:{address[1]}"
        writer.write(raw or f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), TIMEOUT)  # the server closes
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    assert status_line.startswith("HTTP/1.1 ")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    assert headers["connection"] == "close"
    if method != "HEAD":
        assert int(headers["content-length"]) == len(body)
    return int(status_line.split(" ")[1]), headers, body


async def get_json(address: tuple[str, int], path: str) -> object:
    status, headers, body = await http(address, path)
    assert status == 200, body
    assert headers["content-type"] == "application/json"
    return json.loads(body)


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


def parse_exposition(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text format 0.0.4: every sample, checked against its # TYPE."""
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram") and name not in types
            types[name] = kind
            continue
        if line.startswith("#"):
            assert line.startswith("# HELP ")
            continue
        match = SAMPLE.match(line)
        assert match, line
        name, labels, value = match.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or types.get(family) == "histogram", line
        pairs = frozenset(LABEL.findall(labels or ""))
        key = (name, pairs)
        assert key not in samples, f"duplicate sample {line}"
        samples[key] = float(value)
    return samples


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def metrics(address: tuple[str, int]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, headers, body = await http(address, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_exposition(body.decode())


async def until(check: object, what: str, timeout: float = TIMEOUT) -> None:
    """Poll an async predicate until it holds, for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.02)  # polling interval, bounded by the deadline


async def bad_pdu(address: tuple[str, int], pdu: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(pdu)
    answer = await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()
    return answer


async def test_metrics_after_known_activations(served: Served) -> None:
    assert WIN
    conn = await KmsConnection.open(*served.kms_address)
    for _ in range(3):
        await conn.activate(base_request(WIN, major=6))
    await conn.activate(base_request(WIN, major=4))
    await conn.activate(base_request(WIN, major=6, required_count=1))
    unknown = dataclasses.replace(base_request(WIN, major=6), sku_id=uuid.uuid4().bytes_le)
    unknown = dataclasses.replace(unknown, kms_id=uuid.uuid4().bytes_le)
    await conn.activate(unknown)
    with pytest.raises(HostRefused):
        await conn.activate(base_request(WIN, major=6, required_count=1001))
    await conn.close()
    # An RPC 4.0 bind (bind_nak, close) and an RPC 4.0 request (fault, close).
    nak = await bad_pdu(served.kms_address, HEADER.pack(4, 0, 11, 3, DREP_LE, 16, 0, 1))
    fault = await bad_pdu(served.kms_address, HEADER.pack(4, 0, 0, 3, DREP_LE, 16, 0, 2))
    assert nak[2] == 13 and fault[2] == 3

    async def all_closed() -> bool:
        return not served.kms.connections

    await until(all_closed, "connections closed")
    m = await metrics(served.address)
    act = "kmsd_activations_total"
    win = {"application": "Windows", "product": "Windows 10/11 Enterprise"}
    assert value(m, act, **win, protocol="6.0", result="below_threshold") == 3
    assert value(m, act, **win, protocol="4.0", result="below_threshold") == 1
    assert value(m, act, **win, protocol="6.0", result="activated") == 1
    assert (
        value(
            m,
            act,
            application="Windows",
            product="unknown",
            protocol="6.0",
            result="below_threshold",
        )
        == 1
    )
    # Refused after decoding: labelled with what the request named.
    assert value(m, act, **win, protocol="6.0", result="refused-0x8007000D") == 1
    assert sum(v for (name, _), v in m.items() if name == act) == 7
    assert value(m, "kmsd_clients", application="Windows") == 6
    assert value(m, "kmsd_client_table_capacity", application="Windows") == 50
    errors = {
        dict(k).get("kind", "") + "/" + dict(k).get("code", ""): v
        for (n, k), v in m.items()
        if n == "kmsd_errors_total"
    }
    assert errors == {
        "kms_error/INVALID_DATA": 1,
        "bind_nak/PROTOCOL_VERSION_NOT_SUPPORTED": 1,
        "fault/PROTO_ERROR": 1,
        "close/": 2,
        "commit/": 0,
    }
    assert value(m, "kmsd_connections_accepted_total") == 3
    assert value(m, "kmsd_connections_open") == 0
    # Latency: one observation per answered call (7), buckets cumulative up to +Inf.
    assert value(m, "kmsd_reply_seconds_count") == 7
    assert value(m, "kmsd_reply_seconds_bucket", le="+Inf") == 7
    assert 0 < value(m, "kmsd_reply_seconds_sum") < 7 * TIMEOUT
    buckets = [v for (n, k), v in m.items() if n == "kmsd_reply_seconds_bucket"]
    assert buckets == sorted(buckets)
    assert value(m, "kmsd_ready") == 1
    # The recent activations, newest first, on the status API.
    status = await get_json(served.address, "/api/status")
    assert isinstance(status, dict)
    assert [r["result"] for r in status["recent"]][:2] == ["refused-0x8007000D", "below_threshold"]
    assert status["recent"][-1]["workstation"] == "kmsclient.lab.test"


def test_label_sets_stay_bounded() -> None:
    """Refusal reasons collapse into kinds; made-up products and applications into one."""
    metrics = Metrics()
    admission: Admission[int] = Admission(
        max_connections=2,
        max_per_ip=1,
        allow=(ipaddress.ip_network("10.0.0.0/8"),),
        rate_per_ip=0.0,
    )
    assert admission.admit("10.0.0.1", 1, 0) == (None, None)
    for address in ("192.0.2.1", "10.0.0.1"):
        reason, _ = admission.admit(address, 2, 0)
        assert reason is not None
        metrics.refused_connection(reason)
    assert metrics.refused == {"not_allowed": 1, "per_address_limit": 1}
    for i in range(100):
        metrics.activation(f"app {i}", f"product {i}", "6.0", 1, 25, "ws", "a", 0)
    assert list(metrics.activations) == [("unknown", "unknown", "6.0", "below_threshold")]
    assert len(metrics.recent) < 100


def cli_json(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "kmsd", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout


def admin_address(kmsd: KmsdProcess) -> tuple[str, int]:
    entry = next(e for e in kmsd.log if e.get("event") == "admin endpoint")
    host, _, port = str(entry["address"]).rpartition(":")
    return host.strip("[]"), int(port)


async def activate(kmsd: KmsdProcess, request: BaseRequest) -> int:
    conn = await KmsConnection.open(kmsd.host, kmsd.port)
    try:
        reply = await asyncio.wait_for(conn.activate(request), TIMEOUT)
    finally:
        await conn.close()
    return reply.base.count


async def test_json_api_is_what_the_cli_prints(tmp_path: Path) -> None:
    assert WIN and OFFICE
    path = str(tmp_path / "kmsd.db")
    kmsd = start_kmsd("--admin", f"{LOOPBACK}:0", db=path)
    try:
        address = admin_address(kmsd)
        for i in range(3):
            await activate(kmsd, base_request(WIN, workstation=f"pc-{i}.lab.test"))
        await activate(kmsd, base_request(OFFICE, workstation="office.lab.test"))
        for api, command in (("/api/clients", "clients"), ("/api/stats", "stats")):
            status, _, body = await http(address, api)
            assert status == 200
            assert body.decode() == cli_json(command, "--db", path)
        status, _, body = await http(address, "/api/clients?app=Office%202013%20and%20later")
        assert body.decode() == cli_json("clients", "--db", path, "--app", "Office 2013 and later")
        assert [c["workstation"] for c in json.loads(body)] == ["office.lab.test"]
        status, _, body = await http(address, "/api/clients?app=Solitaire")
        assert status == 400 and b"unknown application" in body
    finally:
        assert stop_kmsd(kmsd) == 0
    assert not [e for e in kmsd.log if e.get("level") == "error"]


async def test_kmsd_stats_shows_what_the_daemon_tells_clients(tmp_path: Path) -> None:
    """kmsd stats reads the daemon's configuration (here a file), so with a lab override it
    prints the count clients are told, like /api/stats."""
    assert WIN
    path = str(tmp_path / "kmsd.db")
    conf = tmp_path / "kmsd.toml"
    conf.write_text("[table]\nprecharge = 24\n")
    kmsd = start_kmsd("--admin", f"{LOOPBACK}:0", "--config", str(conf), db=path)
    try:
        assert await activate(kmsd, base_request(WIN)) == 25
        status, _, body = await http(admin_address(kmsd), "/api/stats")
        assert status == 200
        assert body.decode() == cli_json("stats", "--db", path, "--config", str(conf))
        (row,) = json.loads(body)
        assert (row["count"], row["counted"], row["override"]) == (25, 1, "precharge 24")
        text = subprocess.run(
            [sys.executable, "-m", "kmsd", "stats", "--db", path, "--config", str(conf)],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        assert "lab override precharge 24: COUNT is what clients are told" in text
    finally:
        assert stop_kmsd(kmsd) == 0


async def test_kmsd_stats_knows_an_override_given_on_the_daemons_command_line(
    tmp_path: Path,
) -> None:
    """An override given only to the daemon (no file, no variable): the daemon records it in
    the database, so `kmsd stats` in another process still prints what clients are told;
    a later start without it takes it back."""
    assert WIN
    path = str(tmp_path / "kmsd.db")
    kmsd = start_kmsd("--admin", f"{LOOPBACK}:0", "--precharge", "24", db=path)
    try:
        assert await activate(kmsd, base_request(WIN)) == 25
        status, _, body = await http(admin_address(kmsd), "/api/stats")
        assert status == 200 and body.decode() == cli_json("stats", "--db", path)
        assert "lab override precharge 24" in run_kmsd("stats", "--db", path).stdout
    finally:
        assert stop_kmsd(kmsd) == 0
    kmsd = start_kmsd(db=path)  # the real count again
    try:
        (row,) = json.loads(cli_json("stats", "--db", path))
        assert (row["count"], row["counted"], row["override"]) == (1, 1, None)
        assert "lab override" not in run_kmsd("stats", "--db", path).stdout
    finally:
        assert stop_kmsd(kmsd) == 0


async def test_memory_database_is_read_between_commits(tmp_path: Path) -> None:
    assert WIN
    served = await serve(MEMORY)
    try:
        conn = await KmsConnection.open(*served.kms_address)
        await conn.activate(base_request(WIN, workstation="ram.lab.test"))
        await conn.close()
        clients = await get_json(served.address, "/api/clients")
        assert isinstance(clients, list)
        assert [c["workstation"] for c in clients] == ["ram.lab.test"]
        stats = await get_json(served.address, "/api/stats")
        assert stats == [
            {
                "application": "Windows",
                "count": 1,
                "counted": 1,
                "capacity": 50,
                "thresholds": {"25": False},
                "override": None,
            }
        ]
    finally:
        await shut(served)


@pytest.mark.parametrize(
    ("policy", "told", "override", "gauges"),
    [
        (HostPolicy(precharge=24), 26, "precharge 24", {"precharge": 24}),
        (HostPolicy(fixed_count=50), 50, "fixed count 50", {"precharge": 0, "fixed_count": 50}),
    ],
)
async def test_stats_show_the_count_clients_are_told(
    tmp_path: Path, policy: HostPolicy, told: int, override: str, gauges: dict[str, int]
) -> None:
    """With a lab override the API, the metrics and the status page say what clients get."""
    assert WIN
    served = await serve(str(tmp_path / "kmsd.db"), policy)
    try:
        conn = await KmsConnection.open(*served.kms_address)
        counts = [(await conn.activate(base_request(WIN))).base.count for _ in range(2)]
        await conn.close()
        assert counts[-1] == told
        stats = await get_json(served.address, "/api/stats")
        assert stats == [
            {
                "application": "Windows",
                "count": told,
                "counted": 2,
                "capacity": 50,
                "thresholds": {"25": True},
                "override": override,
            }
        ]
        m = await metrics(served.address)
        assert value(m, "kmsd_clients", application="Windows") == 2
        assert value(m, "kmsd_reported_count", application="Windows") == told
        shown = {dict(k)["override"]: v for (n, k), v in m.items() if n == "kmsd_lab_override"}
        assert shown == gauges
        _, _, page = await http(served.address, "/")
        assert b"lab override: ${s.override} (${s.counted} counted)" in page
    finally:
        await shut(served)


async def test_strict_refusals_keep_what_the_request_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = DB.sku_by_name("Windows 10/11 Home")
    assert home
    served = await serve(str(tmp_path / "kmsd.db"), HostPolicy(strict=True))
    try:
        conn = await KmsConnection.open(*served.kms_address)
        request = base_request(home, workstation="retail.lab.test")
        with pytest.raises(HostRefused):
            await conn.activate(request)
        await conn.close()
        m = await metrics(served.address)
        labels = {"application": "Windows", "product": "Windows 10/11 Home", "protocol": "6.0"}
        assert value(m, "kmsd_activations_total", **labels, result="refused-0xC004F042") == 1
        status = await get_json(served.address, "/api/status")
        assert isinstance(status, dict)
        assert status["recent"][0]["workstation"] == "retail.lab.test"
        assert status["recent"][0]["product"] == "Windows 10/11 Home"
    finally:
        await shut(served)
    logged = capsys.readouterr()
    line = next(x for x in (logged.out + logged.err).splitlines() if "request refused" in x)
    assert request.cmid_text in line and "retail.lab.test" in line
    assert "Windows 10/11 Home" in line


async def test_health_and_readiness(served: Served) -> None:
    assert WIN
    status, _, body = await http(served.address, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    ready = await get_json(served.address, "/readyz")
    assert ready == {
        "ready": True,
        "checks": {
            "listening": True,
            "last_commit_ok": True,
            "checkpoint_ok": True,
            "database_file_ok": True,
        },
    }
    # A commit that fails makes the host not ready, until a commit succeeds again.
    blocker = sqlite3.connect(served.path, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    task = asyncio.create_task(_activate(served))

    async def not_ready() -> bool:
        return (await http(served.address, "/readyz"))[0] == 503

    await until(not_ready, "readyz 503 while commits fail")
    m = await metrics(served.address)
    assert value(m, "kmsd_errors_total", kind="commit", code="") >= 1
    assert value(m, "kmsd_ready") == 0
    blocker.rollback()
    blocker.close()

    async def ready_again() -> bool:
        return (await http(served.address, "/readyz"))[0] == 200

    await until(ready_again, "readyz 200 once the retried commit succeeds")
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, OSError):
        await asyncio.wait_for(task, TIMEOUT)  # its reply was dropped: not durable then
    # Stopped listening: not ready.
    await served.kms.stop()
    status, _, body = await http(served.address, "/readyz")
    assert status == 503 and json.loads(body)["checks"]["listening"] is False


async def test_failing_checkpoints_make_the_host_not_ready(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As when kmsd changed user and cannot open the database again: commits work on the
    connection opened before, checkpoints do not, and the log grows."""

    def cannot_open() -> sqlite3.Connection:
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(served.store, "_checkpoint_connection", cannot_open)
    await _activate(served)  # a commit: a checkpoint is due

    async def not_ready() -> bool:
        return (await http(served.address, "/readyz"))[0] == 503

    await until(not_ready, "readyz 503 while checkpoints fail")
    checks = (await http(served.address, "/readyz"))[2]
    assert json.loads(checks)["checks"]["checkpoint_ok"] is False
    monkeypatch.undo()
    await _activate(served)

    async def ready_again() -> bool:
        return (await http(served.address, "/readyz"))[0] == 200

    await until(ready_again, "readyz 200 once a checkpoint works")


async def _activate(served: Served) -> None:
    assert WIN
    conn = await KmsConnection.open(*served.kms_address)
    try:
        await conn.activate(base_request(WIN))
    finally:
        await conn.close()


async def test_http_edge_cases(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    address = served.address
    status, _, body = await http(address, "/nowhere")
    assert status == 404 and json.loads(body) == {"error": "no such page: /nowhere"}
    status, headers, _ = await http(address, "/metrics", method="POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    status, headers, body = await http(address, "/", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 1000
    status, headers, body = await http(address, "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert b"<title>kmsd status</title>" in body and b"http" not in body.split(b"<script>")[1]
    assert "script-src 'sha256-" in headers["content-security-policy"]
    huge = b"GET / HTTP/1.1\r\nX-Filler: " + b"a" * (web.MAX_HEAD + 10) + b"\r\n\r\n"
    status, _, _ = await http(address, raw=huge)
    assert status == 431
    status, _, _ = await http(address, raw=b"GARBAGE\r\n\r\n")
    assert status == 400
    status, _, _ = await http(address, raw=b"GET / HTTP/2.0\r\n\r\n")
    assert status == 505
    # On loopback, a request naming another host is refused (DNS rebinding protection).
    for host, expected in (
        ("evil.example:9688", 421),
        ("localhost:9688", 200),
        ("127.0.0.1", 200),
        ("[::1]:9688", 200),
    ):
        status, _, _ = await http(
            address, raw=f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        )
        assert status == expected, host
    # A request head that never completes gets 408 once its time is up.
    monkeypatch.setattr(web, "REQUEST_TIMEOUT", 0.2)
    status, _, _ = await http(address, raw=b"GET / HTTP/1.1\r\n")
    assert status == 408
    # The endpoint still serves afterwards.
    assert (await http(address, "/healthz"))[0] == 200


async def test_idle_connections_cannot_keep_health_probes_out() -> None:
    """More idle connections than the endpoint serves at once: each probe takes the place
    of the one that has waited longest, and is answered; kmsd (on its own loop, uvloop when
    installed) writes nothing but its JSON log lines meanwhile."""
    kmsd = start_kmsd("--admin", f"{LOOPBACK}:0")
    address = admin_address(kmsd)
    idle = [await asyncio.open_connection(*address) for _ in range(web.MAX_CLIENTS + 8)]
    try:
        idle[0][1].write(b"GET /healthz HTTP/1.1\r\n")  # a head that never ends
        for _ in range(10):
            status, _, body = await http(address, "/healthz")
            assert status == 200, body
        # The oldest gave way: closed without an answer.
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(idle[0][0].read(), TIMEOUT) == b""
    finally:
        for _, writer in idle:
            writer.close()
        assert stop_kmsd(kmsd) == 0  # its log, every line JSON, was read to the end
    assert not [e for e in kmsd.log if e.get("level") in ("error", "critical")]


async def test_admin_endpoint_is_off_by_default_and_a_busy_port_stops_kmsd() -> None:
    kmsd = start_kmsd()
    stop_kmsd(kmsd)
    assert not [e for e in kmsd.log if e.get("event") == "admin endpoint"]
    with socket.socket() as busy:
        busy.bind((LOOPBACK, 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                *(sys.executable, "-m", "kmsd", "--listen", f"{LOOPBACK}:0", "--db", MEMORY),
                *("--admin", f"{LOOPBACK}:{port}"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert f"admin endpoint: cannot listen on {LOOPBACK}:{port}" in result.stderr


async def test_status_page_in_a_headless_browser_shows_a_new_client(tmp_path: Path) -> None:
    """Debian's chromium, driven over the DevTools protocol: the page loads, its script
    fetches the JSON API and shows a client that has just activated, and a workstation
    name with terminal escapes and a right-to-left override inert (as kmsd.text does)."""
    assert WIN
    kmsd = start_kmsd("--admin", f"{LOOPBACK}:0", db=str(tmp_path / "kmsd.db"))
    browser = Browser(tmp_path / "profile")
    try:
        host, port = admin_address(kmsd)
        workstation = f"browser-{uuid.uuid4().hex[:8]}.lab.test"
        hostile = "evil\u202egpj.exe\u2066\x1b[2K\x85"
        assert await activate(kmsd, base_request(WIN, workstation=workstation)) == 1
        assert await activate(kmsd, base_request(WIN, workstation=hostile)) == 2
        page = await asyncio.to_thread(browser.open, f"http://{host}:{port}/")
        deadline = time.monotonic() + 30
        text = ""
        while inert(hostile) not in text and time.monotonic() < deadline:
            # The page refreshes itself every few seconds; poll what it shows.
            text = (
                await asyncio.to_thread(
                    browser.evaluate, page, "document.body ? document.body.innerText : ''"
                )
                or ""
            )
        assert workstation in text
        assert "Windows 10/11 Enterprise" in text and "of 25 needed" in text
        assert inert(hostile) in text  # and no raw control but innerText's own tabs and lines:
        assert not [c for c in text if ord(c) in UNSAFE and c not in "\t\n"]
        every = "a" + "".join(map(chr, UNSAFE)) + "\u00e9\u202fz"
        shown = await asyncio.to_thread(browser.evaluate, page, f"inert({json.dumps(every)})")
        assert shown == inert(every)  # the page's twin of kmsd.text.inert
        ready = await asyncio.to_thread(
            browser.evaluate, page, "document.getElementById('ready').className"
        )
        assert ready == "badge ok"
        error = await asyncio.to_thread(
            browser.evaluate, page, "document.getElementById('error').style.display"
        )
        assert error == "none"  # no API errors shown
        # Several publication targets: the summary names each one (a status as the API
        # would give it, shown by the page's own function).
        two = {"zone": "a.test", "published": True}, {"zone": "b.test", "published": False}
        status = {
            "ready": True, "checks": {}, "version": "0", "uptime_seconds": 1,
            "connections_open": 0, "connections_accepted": 0, "recent": [],
            "dns": {**two[0], "targets": list(two)},
        }  # fmt: skip
        summary = await asyncio.to_thread(
            browser.evaluate,
            page,
            f"(() => {{ try {{ showStatus({json.dumps(status)}); }}"
            " catch (e) { return `${e}`; }"
            " return document.getElementById('summary').textContent; })()",
        )
        assert "DNS a.test: published" in summary and "DNS b.test: not published" in summary
        recent = await asyncio.to_thread(
            browser.evaluate, page, "document.getElementById('recent').tBodies[0].textContent"
        )
        assert recent == "None"  # no activation yet: one row that says so (it used to throw)
    finally:
        await asyncio.to_thread(browser.close)
        assert stop_kmsd(kmsd) == 0


def test_dns_publication_state_is_exported() -> None:
    from kmsd.dns.publish import Publisher

    (settings,) = defaults(publish_zone="lab.test", publish_host="kms1.lab.test").dns
    publisher = Publisher(settings, [("192.0.2.1", 1688)])
    m = Metrics()
    m.dns_state = publisher.state
    m.activation("Windows", "Windows 10/11 Enterprise", "6.0", 1, 25, "ws", "a", 0)
    text = m.render(open_connections=0)
    assert value(parse_exposition(text), "kmsd_dns_published", zone="lab.test") == 0
    publisher.published = publisher.desired(("192.0.2.53", 53))
    samples = parse_exposition(m.render(open_connections=0))
    assert value(samples, "kmsd_dns_published", zone="lab.test") == 1
    assert publisher.state()["srv"] == "0 0 1688 kms1.lab.test."
    publisher.server = ("::1", 5353)
    assert publisher.state()["server"] == "[::1]:5353"  # an IPv6 server as people write it
    assert "kmsd_dns_published" not in {
        n for n, _ in parse_exposition(Metrics().render(open_connections=0))
    }
