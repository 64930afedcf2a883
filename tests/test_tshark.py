"""Wireshark's DCE-RPC dissector reads kmsd's traffic without finding anything malformed.

tshark captures a set of exchanges on the loopback interface: V4/V5/V6 calls in NDR32 and
NDR64, with and without bind-time feature negotiation and PFC_CONC_MPX, an alter_context,
fragmented requests, faults, an HRESULT error stub and a bind_nak. The
capture is then dissected again from the file: no frame kmsd sent may be malformed or carry
an error-level expert item, and every PDU type is counted. One deliberately broken bind
from the client shows that the malformed check does catch a malformed PDU.
"""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NoReturn

import pytest

from kmsclient.session import KmsConnection
from kmsd.protocol import kms, ndr
from kmsd.protocol.client import BindOptions, RpcClient, base_request
from kmsd.protocol.errors import FaultStatus, HResult, KmsError
from kmsd.protocol.rpc import (
    KMS_INTERFACE,
    NDR32,
    NDR64,
    WHOLE,
    Bind,
    BindAck,
    BindNak,
    ContextElement,
    Fault,
    Flags,
    PType,
    Request,
    Response,
    Result,
    parse_header,
    parse_pdu,
)
from tests.conftest import KmsdProcess, sku

SKU = sku("Windows 10/11 Enterprise")
assert SKU is not None
EXCHANGE_TIMEOUT = 60  # seconds for the whole client side of the scenario
TSHARK_TIMEOUT = 30  # seconds for tshark to start, to show a probe, to stop, to read back
PROBE_WAIT = 1.5  # seconds to see one probe connection before sending another
EXPERT_ERROR = 0x00800000  # PI_ERROR in Wireshark's expert severities


def tshark_path() -> str:
    path = shutil.which("tshark")
    if path:
        return path
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("tshark is not on PATH; CI must install it (apt-get install -y tshark)")
    pytest.skip("tshark is not on PATH (apt-get install tshark to run this test)")


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _next_line(lines: queue.Queue[str | None], deadline: float) -> str | None:
    """The next line before the deadline; None at end of stream; raises TimeoutError."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    try:
        return lines.get(timeout=left)
    except queue.Empty:
        raise TimeoutError from None


class Capture:
    """tshark writing a pcapng of one TCP port on loopback, printing each frame's ports.

    The printed ports are what makes start and stop exact: a probe connection that shows
    up in tshark's output proves that capture is running, and that every frame before it
    is already in the file.
    """

    def __init__(self, tshark: str, host: str, port: int, path: Path) -> None:
        self.host, self.port, self.path = host, port, path
        self.process = subprocess.Popen(
            [
                tshark,
                "-i",
                "lo",
                "-f",
                f"tcp port {port}",
                "-w",
                str(path),
                "-P",
                "-l",
                "-T",
                "fields",
                "-e",
                "tcp.srcport",
                "-e",
                "tcp.dstport",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self.stdout: queue.Queue[str | None] = queue.Queue()
        self.stderr: queue.Queue[str | None] = queue.Queue()
        self.messages: list[str] = []
        for stream, lines in (
            (self.process.stdout, self.stdout),
            (self.process.stderr, self.stderr),
        ):
            threading.Thread(target=_pump, args=(stream, lines), daemon=True).start()

    def _fail(self, why: str) -> NoReturn:
        self.stop()
        pytest.fail(f"tshark {why}: {self.stderr_text()}")

    def stderr_text(self) -> str:
        """What tshark wrote to stderr so far."""
        while True:
            try:
                line = self.stderr.get_nowait()
            except queue.Empty:
                return "".join(self.messages)
            if line is not None:
                self.messages.append(line)

    def wait_capturing(self) -> None:
        deadline = time.monotonic() + TSHARK_TIMEOUT
        while True:
            try:
                line = _next_line(self.stderr, deadline)
            except TimeoutError:
                self._fail(f"did not start capturing within {TSHARK_TIMEOUT} s")
            if line is None:
                self._fail(f"exited with status {self.process.wait(timeout=TSHARK_TIMEOUT)}")
            self.messages.append(line)
            if line.startswith("Capturing on "):
                break
        self.probe()

    def probe(self) -> None:
        """Connect to the captured port and wait until tshark shows that connection."""
        deadline = time.monotonic() + TSHARK_TIMEOUT
        while time.monotonic() < deadline:
            with socket.create_connection((self.host, self.port), timeout=TSHARK_TIMEOUT) as s:
                mine = str(s.getsockname()[1])
            seen_by = min(deadline, time.monotonic() + PROBE_WAIT)
            while True:
                try:
                    line = _next_line(self.stdout, seen_by)
                except TimeoutError:
                    break
                if line is None:
                    self._fail("stopped printing frames")
                if mine in line.split():
                    return
        self._fail(f"showed no probe connection within {TSHARK_TIMEOUT} s")

    def stop(self) -> int:
        """SIGINT, as Ctrl-C would; returns tshark's exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=TSHARK_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=TSHARK_TIMEOUT)
            raise


@pytest.fixture
def tshark() -> str:
    """tshark's path; skips (fails in CI) before kmsd starts if it is missing."""
    return tshark_path()


@pytest.fixture
def capture(tshark: str, kmsd_process: KmsdProcess, tmp_path: Path) -> Iterator[Capture]:
    cap = Capture(tshark, kmsd_process.host, kmsd_process.port, tmp_path / "kms.pcapng")
    try:
        cap.wait_capturing()
        yield cap
    finally:
        cap.stop()


@dataclass
class Tally:
    """The PDUs the client side sent and received, by type, and the activations so far."""

    pdus: Counter[int] = field(default_factory=Counter)
    fault_statuses: list[int] = field(default_factory=list)
    activations: int = 0

    def counted(self, count: int) -> None:
        """Every activation uses a new client machine ID, so the count grows by one."""
        self.activations += 1
        assert count == self.activations

    def sent(self, data: bytes) -> bytes:
        self._count(data)
        return data

    def _count(self, data: bytes) -> None:
        while data:
            header = parse_header(data)
            assert 16 <= header.frag_length <= len(data), data.hex()
            self.pdus[header.ptype] += 1
            data = data[header.frag_length :]

    async def read(self, conn: KmsConnection) -> bytes:
        pdu = await conn.read_pdu()
        self._count(pdu)
        return pdu


async def open_connection(kmsd: KmsdProcess, tally: Tally, options: BindOptions) -> KmsConnection:
    """KmsConnection.open, with the bind and bind_ack counted."""
    reader, writer = await asyncio.open_connection(kmsd.host, kmsd.port)
    conn = KmsConnection(reader, writer, RpcClient(options))
    writer.write(tally.sent(conn.rpc.bind()))
    conn.rpc.on_bind_ack(await tally.read(conn))
    return conn


async def activate(conn: KmsConnection, tally: Tally, major: int, prefer_ndr64: bool) -> None:
    """One verified activation through kmsclient, in the transfer syntax asked for."""
    base = base_request(SKU, major=major, client_machine_id=uuid.uuid4())
    iv = os.urandom(16)
    pdu, ctx_id, ndr64 = conn.rpc.request(
        kms.encode_request(base, iv=iv), prefer_ndr64=prefer_ndr64
    )
    assert ndr64 == prefer_ndr64, conn.rpc.contexts
    conn.writer.write(tally.sent(pdu))
    payload = conn.rpc.on_response(await tally.read(conn), ctx_id, ndr64)
    tally.counted(kms.decode_response(base, iv, payload).base.count)


async def raw_call(
    conn: KmsConnection,
    tally: Tally,
    call_id: int,
    ctx_id: int,
    stub: bytes,
    *,
    opnum: int = 0,
    fragment: int = 0,
) -> list[Response | Fault]:
    """A request built here (optionally in fragments of `fragment` stub bytes) and its reply
    PDUs, read until the last fragment."""
    size = fragment or len(stub)
    for at in range(0, len(stub), size):
        flags = (Flags.FIRST_FRAG if at == 0 else 0) | (
            Flags.LAST_FRAG if at + size >= len(stub) else 0
        )
        request = Request(call_id, ctx_id, stub[at : at + size], opnum, flags, len(stub) - at)
        conn.writer.write(tally.sent(request.encode()))
    replies: list[Response | Fault] = []
    while not replies or not replies[-1].flags & Flags.LAST_FRAG:
        reply = parse_pdu(await tally.read(conn))
        assert isinstance(reply, Response | Fault), reply
        assert reply.call_id == call_id
        replies.append(reply)
    return replies


async def bad_input(conn: KmsConnection, tally: Tally) -> None:
    """Faults and an HRESULT error stub on an NDR32 connection, then a good call."""
    good = ndr.wrap_request(kms.encode_request(base_request(SKU, major=4)), False)
    expected = [
        (7, 0, good, FaultStatus.UNK_IF),  # a context that was never bound
        (0, 1, good, FaultStatus.OP_RNG_ERROR),  # an operation the interface lacks
        (0, 0, b"\xff" * 10, FaultStatus.BAD_STUB_DATA),  # not an NDR stub
    ]
    for call_id, (ctx_id, opnum, stub, status) in enumerate(expected, start=100):
        [fault] = await raw_call(conn, tally, call_id, ctx_id, stub, opnum=opnum)
        assert isinstance(fault, Fault)
        assert fault.status == status
        tally.fault_statuses.append(status)
    with pytest.raises(KmsError) as refused:
        await activate(conn, tally, 7, False)  # no such protocol version
    assert refused.value.hresult == HResult.INVALID_DATA
    await activate(conn, tally, 6, False)


async def alter_context(kmsd: KmsdProcess, tally: Tally) -> None:
    """vlmcs's way: bind offering NDR32 and NDR64, then alter_context for NDR32 on ctx 0."""
    conn = await open_connection(kmsd, tally, BindOptions(ndr64=True, btfn=False))
    assert conn.rpc.contexts == {1: True}
    alter = Bind(9, (ContextElement(0, KMS_INTERFACE, (NDR32,)),), alter=True)
    conn.writer.write(tally.sent(alter.encode()))
    ack = parse_pdu(await tally.read(conn))
    assert isinstance(ack, BindAck) and ack.alter
    assert [r.result for r in ack.results] == [Result.ACCEPTANCE]
    conn.rpc.contexts[0] = False
    await activate(conn, tally, 6, False)
    await activate(conn, tally, 5, True)
    await conn.close()


async def fragmented(kmsd: KmsdProcess, tally: Tally, ndr64: bool) -> None:
    """A request sent in fragments of 40 stub bytes; kmsd answers with one response PDU,
    even though the bind offered a max_recv_frag of only 64."""
    reader, writer = await asyncio.open_connection(kmsd.host, kmsd.port)
    conn = KmsConnection(reader, writer, RpcClient())
    syntax = NDR64 if ndr64 else NDR32
    bind = Bind(1, (ContextElement(0, KMS_INTERFACE, (syntax,)),), max_recv_frag=64)
    writer.write(tally.sent(bind.encode()))
    ack = parse_pdu(await tally.read(conn))
    assert isinstance(ack, BindAck)
    assert [(r.result, r.syntax) for r in ack.results] == [(Result.ACCEPTANCE, syntax)]
    base = base_request(SKU, major=6)
    iv = os.urandom(16)
    stub = ndr.wrap_request(kms.encode_request(base, iv=iv), ndr64)
    [reply] = await raw_call(conn, tally, 2, 0, stub, fragment=40)
    assert isinstance(reply, Response) and reply.flags & WHOLE == WHOLE
    payload, status = ndr.unwrap_response(reply.stub, ndr64)
    assert status == 0
    tally.counted(kms.decode_response(base, iv, payload).base.count)
    await conn.close()


async def malformed_bind(kmsd: KmsdProcess, tally: Tally) -> int:
    """A bind claiming two context elements but carrying one: kmsd answers bind_nak.
    Returns the client's port, whose frame Wireshark must flag as malformed."""
    reader, writer = await asyncio.open_connection(kmsd.host, kmsd.port)
    conn = KmsConnection(reader, writer, RpcClient())
    good = Bind(1, (ContextElement(0, KMS_INTERFACE, (NDR32,)),), flags=WHOLE).encode()
    bad = good[:24] + struct.pack("<B", 2) + good[25:]
    writer.write(tally.sent(bad))
    assert isinstance(parse_pdu(await tally.read(conn)), BindNak)
    assert await reader.read() == b"", "kmsd should close after a bind_nak"
    port = int(writer.get_extra_info("sockname")[1])
    await conn.close()
    return port


async def scenario(kmsd: KmsdProcess, tally: Tally) -> int:
    """The client side; returns the malformed bind's client port."""
    # NDR64 + BTFN + multiplexing (the vlmcs default), NDR32 (BTFN on, then everything
    # off), and NDR64 without BTFN or multiplexing; V4, V5 and V6 on each.
    for options, ndr64 in [
        (BindOptions(), True),
        (BindOptions(ndr64=False), False),
        (BindOptions(ndr64=False, btfn=False, multiplex=False), False),
        (BindOptions(btfn=False, multiplex=False), True),
    ]:
        conn = await open_connection(kmsd, tally, options)
        assert set(conn.rpc.contexts.values()) == {ndr64}
        for major in (4, 5, 6):
            await activate(conn, tally, major, ndr64)
        await conn.close()
    conn = await open_connection(kmsd, tally, BindOptions(ndr64=False))
    await bad_input(conn, tally)
    await conn.close()
    await alter_context(kmsd, tally)
    await fragmented(kmsd, tally, False)
    await fragmented(kmsd, tally, True)
    return await malformed_bind(kmsd, tally)


def dissect(tshark: str, path: Path, port: int) -> list[dict[str, list[str]]]:
    """Every frame of the capture as {field: occurrences}, DCE-RPC decoding forced on port."""
    fields = [
        "frame.number",
        "tcp.srcport",
        "tcp.dstport",
        "_ws.malformed",
        "_ws.expert.severity",
        "_ws.expert.message",
        "dcerpc.pkt_type",
        "dcerpc.cn_status",
    ]
    result = subprocess.run(
        [tshark, "-r", str(path), "-d", f"tcp.port=={port},dcerpc", "-T", "fields"]
        + [arg for name in fields for arg in ("-e", name)]
        + ["-E", "occurrence=a", "-E", "aggregator=|"],
        capture_output=True,
        text=True,
        timeout=TSHARK_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    frames = []
    for line in result.stdout.splitlines():
        values = line.split("\t")
        assert len(values) == len(fields), line
        frames.append(
            {name: v.split("|") if v else [] for name, v in zip(fields, values, strict=True)}
        )
    return frames


async def test_wireshark_dissects_kmsd_traffic(
    tshark: str, kmsd_process: KmsdProcess, capture: Capture
) -> None:
    tally = Tally()
    async with asyncio.timeout(EXCHANGE_TIMEOUT):
        bad_port = await scenario(kmsd_process, tally)
    assert tally.activations == 4 * 3 + 1 + 2 + 2
    capture.probe()  # every frame of the scenario is now in the file
    assert capture.stop() == 0, capture.stderr_text()

    frames = dissect(tshark, capture.path, kmsd_process.port)
    assert frames, "nothing captured"

    def problems(frame: dict[str, list[str]]) -> list[str]:
        found = ["malformed"] if frame["_ws.malformed"] else []
        for severity, message in zip(
            frame["_ws.expert.severity"], frame["_ws.expert.message"], strict=False
        ):
            if int(severity) >= EXPERT_ERROR:
                found.append(message)
        return found

    flagged = {int(f["frame.number"][0]): (f, problems(f)) for f in frames if problems(f)}
    from_kmsd = {
        n: p for n, (f, p) in flagged.items() if f["tcp.srcport"] == [str(kmsd_process.port)]
    }
    assert not from_kmsd, f"Wireshark flags frames kmsd sent: {from_kmsd}"
    # The deliberately broken bind is the only other flagged frame, and it is flagged.
    assert [f["tcp.srcport"] for f, _ in flagged.values()] == [[str(bad_port)]], flagged

    dissected = Counter(int(t) for f in frames for t in f["dcerpc.pkt_type"])
    assert dissected == tally.pdus
    # The client side saw what the scenario is built to produce.
    assert tally.pdus == {
        PType.BIND: 9,
        PType.BIND_ACK: 8,
        PType.BIND_NAK: 1,
        PType.ALTER_CONTEXT: 1,
        PType.ALTER_CONTEXT_RESP: 1,
        PType.REQUEST: 4 * 3 + 5 + 2 + 2 * 7,
        PType.RESPONSE: 4 * 3 + 2 + 2 + 2,
        PType.FAULT: 3,
    }
    statuses = [int(s, 16) for f in frames for s in f["dcerpc.cn_status"]]
    assert statuses == tally.fault_statuses
