"""kmsclient: activation, verification, charge and load, against kmsd, against replayed
captures with tampered replies, and against hosts that misbehave at the TCP level."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from kmsclient import cli
from kmsclient.activation import Activator, CallOptions, activate
from kmsclient.charge import charge
from kmsclient.load import LoadSpec, run_load
from kmsclient.outcome import Status, classify
from kmsclient.target import Target, parse_target
from kmsd.host import HostPolicy
from kmsd.protocol.checks import check_header, verify_reply
from kmsd.protocol.client import (
    BindOptions,
    HostRefused,
    PreparedRequest,
    RpcClient,
    base_request,
    prepare,
)
from kmsd.protocol.crypto import E5, E6, pkcs7_pad, pkcs7_unpad, v6_mac
from kmsd.protocol.errors import NotGenuine
from kmsd.protocol.kms import decode_request
from kmsd.protocol.products import Sku, products
from kmsd.protocol.rpc import NDR64, Bind, Flags, btfn_features, parse_pdu
from kmsd.server import KmsServer
from tests.conftest import LOOPBACK, make_host, server_settings

DB = products()
VECTORS = Path(__file__).parent / "fixtures" / "vectors"
TIMEOUT = 5.0


def sku(name: str) -> Sku:
    found = DB.sku_by_name(name)
    assert found is not None, name
    return found


WIN = sku("Windows 10/11 Enterprise")
WIN7 = sku("Windows 7 Enterprise")
SERVER = sku("Windows Server 2022 Standard")
OFFICE2010 = sku("Office Professional Plus 2010")
OFFICE = sku("Office LTSC Professional Plus 2021")
FAMILIES = [WIN, WIN7, SERVER, OFFICE2010, OFFICE]


def target_of(server: KmsServer) -> Target:
    return Target(*server.addresses[0])


async def run_cli(*args: str) -> tuple[int, str]:
    """`kmsclient ARGS` in a worker thread (it runs its own event loop); (status, stdout)."""
    out = io.StringIO()

    def call() -> int:
        try:
            return cli.main(list(args), out)
        except SystemExit as exc:  # argparse
            return int(exc.code or 0)

    status = await asyncio.wait_for(asyncio.to_thread(call), 30)
    return status, out.getvalue()


# ----------------------------------------------------------------------------- kmsd


@pytest.mark.parametrize("major", [4, 5, 6])
@pytest.mark.parametrize("product", FAMILIES, ids=lambda s: s.name)
async def test_activate_every_family_and_version(
    server: KmsServer, product: Sku, major: int
) -> None:
    for call_ndr64, ctx in ((False, 0), (True, 1)):  # NDR32 after alter_context; NDR64
        result = await activate(
            target_of(server),
            prepare(base_request(product, major=major)),
            CallOptions(call_ndr64=call_ndr64),
        )
        assert result.status == Status.BELOW_THRESHOLD, result.failure
        assert (result.ndr64, result.context_id) == (call_ndr64, ctx)
        assert result.verified is not None and result.warnings == ()
        assert result.verified.reply.base.count == 1 + call_ndr64
        assert result.verified.epid.build == product.kms.csvlk.host_build


@pytest.mark.system
@pytest.mark.parametrize(
    "options",
    [BindOptions(ndr64=False), BindOptions(btfn=False, multiplex=False), BindOptions()],
)
async def test_bind_variants_against_an_ndr32_only_host(options: BindOptions) -> None:
    srv = KmsServer(make_host(), server_settings(ndr64=False))
    await srv.start()
    try:
        for call_ndr64 in (False, True):
            base = base_request(SERVER, required_count=1)
            result = await activate(
                target_of(srv), prepare(base), CallOptions(options, call_ndr64=call_ndr64)
            )
            assert result.status == Status.ACTIVATED and result.warnings == ()
            assert (result.ndr64, result.context_id) == (False, 0)
    finally:
        await srv.stop()


async def test_cli_activate_json_schema_and_exit_statuses(server: KmsServer) -> None:
    host = str(target_of(server))
    status, out = await run_cli("activate", host, "--json", "--product", SERVER.name, "-5")
    data = json.loads(out)
    assert status == Status.BELOW_THRESHOLD == data["exit_status"]
    assert set(data) == {
        "schema", "status", "exit_status", "host", "product", "request", "rpc", "response",
        "error", "warnings",
    }  # fmt: skip
    assert data["schema"] == "kmsclient.activate/1" and data["status"] == "below_threshold"
    assert data["error"]["hresult"] == "0xC004F038"
    assert data["product"]["sku_id"] == str(SERVER.id) and data["request"]["protocol"] == "5.0"
    assert data["rpc"] == {"context_id": 0, "ndr": "NDR32"}
    response = data["response"]
    assert response["count"] == 1 and response["required_count"] == 5
    assert response["epid_decoded"]["build"] == 17763 and response["hwid"] is None
    assert (response["activation_interval"], response["renewal_interval"]) == (120, 10080)

    cmid = "0a6f3c2e-7b41-4d8e-9c15-3e2f1a0b9c01"
    status, out = await run_cli(
        "activate", host, "--product", str(WIN.id), "--required-count", "1", "--cmid", cmid,
        "--previous-cmid", cmid, "--workstation", "pc-01", "--vm", "--license-status", "1",
        "--no-btfn", "--no-multiplex", "--call-syntax", "ndr64", "--timeout", "3",
    )  # fmt: skip
    assert status == Status.ACTIVATED, out
    assert re.search(r"Result\s+activated: count 2 >= 1 required", out)
    assert re.search(r"HWID\s+0123456789ABCDEF", out) and "NDR64 on context 1" in out
    assert "decodes to" in out and "host build 17763" in out

    assert (await run_cli("activate", host, "--product", "No Such Product"))[0] == 2
    assert (await run_cli("activate"))[0] == 2
    assert (await run_cli("activate", host, "--no-ndr64", "--call-syntax", "ndr64"))[0] == 2
    status, out = await run_cli("activate", "--list-products")
    assert status == 0 and WIN.name in out and str(OFFICE.id) in out


@pytest.mark.system
async def test_refused_by_hresult() -> None:
    srv = KmsServer(make_host(HostPolicy(strict=True)), server_settings())
    await srv.start()
    try:
        status, out = await run_cli(
            "activate", str(target_of(srv)), "--product", "Windows 8 Core", "--json"
        )
    finally:
        await srv.stop()
    data = json.loads(out)
    assert status == Status.REFUSED and data["status"] == "refused"
    assert data["error"]["hresult"] == "0xC004F042" and data["response"] is None


@pytest.mark.system
async def test_retail_refusal_is_named_and_its_hresult_printed_once() -> None:
    srv = KmsServer(make_host(HostPolicy(strict=True)), server_settings())
    await srv.start()
    try:
        status, out = await run_cli("activate", str(target_of(srv)), "--product", "Windows 10 Home")
    finally:
        await srv.stop()
    assert status == Status.REFUSED
    result = next(line for line in out.splitlines() if line.startswith("Result"))
    assert result.count("0xC004F042") == 1, result
    assert "SL_E_VL_KEY_MANAGEMENT_SERVICE_ID_MISMATCH" in result
    assert "Windows 10/11 Home is a retail product" in result


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (0x80070005, "host answered HRESULT 0x80070005 (not one KMS hosts are known to send)"),
        (0xC004F06C, "host answered HRESULT 0xC004F06C SL_E_VL_INVALID_TIMESTAMP: the request's"),
    ],
)
def test_host_refused_shows_the_code_received(code: int, text: str) -> None:
    failure = classify(HostRefused(code), TIMEOUT)
    assert failure.status == Status.REFUSED and failure.hresult == code
    assert failure.message.startswith(text)
    assert "S_OK" not in failure.message and failure.message.count(f"0x{code:08X}") == 1


@pytest.mark.system
async def test_python_dash_m_and_usage_status() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kmsclient", "activate", "--help",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0 and b"exit status: 0 activated" in out


@pytest.mark.parametrize(("product", "threshold"), [(WIN, 25), (SERVER, 5), (OFFICE, 5)])
async def test_charge_reaches_the_threshold(
    server: KmsServer, product: Sku, threshold: int
) -> None:
    report = await charge(
        target_of(server), lambda cmid: base_request(product, client_machine_id=cmid), threshold
    )
    assert report.status == Status.ACTIVATED and report.reached
    assert report.counts == list(range(1, threshold + 1))


@pytest.mark.system
async def test_charge_stops_when_the_count_does_not_grow() -> None:
    srv = KmsServer(make_host(HostPolicy(fixed_count=3)), server_settings())
    await srv.start()
    try:
        status, out = await run_cli("charge", str(target_of(srv)), "--json", "--stall", "2")
    finally:
        await srv.stop()
    data = json.loads(out)
    assert status == Status.BELOW_THRESHOLD and data["counts"] == [3, 3, 3]
    assert not data["reached"] and "did not grow" in data["stopped"]


@pytest.mark.system
async def test_load_names_a_refused_connection_apart_from_a_refusal() -> None:
    """ "refused" is the word for a host's HRESULT answer; a closed port is another failure."""
    with socket.socket() as held:  # bound, not listening: connections are refused
        held.bind((LOOPBACK, 0))
        spec = LoadSpec(
            Target(LOOPBACK, held.getsockname()[1]), (6,), clients=2, concurrency=2,
            duration=10, count=6,
        )  # fmt: skip
        report = await run_load(spec, lambda major, cmid, i: base_request(WIN, major=major))
    assert report.errors == {"no listener": 6} and report.status == Status.UNREACHABLE
    assert "refused" not in report.to_text().split("Errors", 1)[1]


async def test_load_interrupted_prints_what_was_measured(server: KmsServer) -> None:
    loop = asyncio.get_running_loop()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kmsclient", "load", str(target_of(server)),
        "--count", "1000000", "--duration", "120", "--loop", "asyncio", "--concurrency", "4",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal
    )  # fmt: skip
    deadline = loop.time() + 60
    while server.metrics.latency_count < 20 and loop.time() < deadline:  # replies written
        await asyncio.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 130, err.decode()
    assert text.startswith("Interrupted   (Ctrl-C) after "), text
    measured = re.search(r"^Activations   (\d+) of (\d+) attempts", text, re.M)
    # The host wrote 20 replies; each of the 4 clients may not have read its last one yet.
    assert measured is not None and 20 - 4 <= int(measured.group(1)) <= int(measured.group(2))
    assert "Latency       p50 " in text


@pytest.mark.parametrize("new_connection", [False, True])
async def test_load_is_bounded_and_summarised(server: KmsServer, new_connection: bool) -> None:
    spec = LoadSpec(
        target_of(server), (4, 5, 6), clients=10, concurrency=3, duration=20, count=60,
        new_connection=new_connection,
    )  # fmt: skip
    report = await run_load(
        spec, lambda major, cmid, i: base_request(WIN, major=major, client_machine_id=cmid)
    )
    data = report.to_json()
    assert data["attempts"] == data["activations"] == 60 and data["errors"] == {}
    assert data["by_protocol"] == {"4": 20, "5": 20, "6": 20}
    assert 0 < data["latency_ms"]["p50"] <= data["latency_ms"]["p90"] <= data["latency_ms"]["p99"]
    assert data["activations_per_s"] > 0 and data["exit_status"] == 0
    assert "Errors        none" in report.to_text()


async def test_load_cli_duration_bound_and_loopback_only(server: KmsServer) -> None:
    status, out = await run_cli(
        "load", str(target_of(server)), "--duration", "0.3", "--count", "10000000", "--json"
    )
    data = json.loads(out)
    assert status == 0 and data["elapsed_s"] < 0.3 + TIMEOUT and data["attempts"] < 10**7
    for host in ("10.1.2.3", "192.0.2.7:1688", "[2001:db8::1]:1688"):
        status, _ = await run_cli("load", host, "--count", "1")
        assert status == Status.USAGE


def test_parse_target() -> None:
    assert parse_target("kms.lab") == Target("kms.lab", 1688)
    assert parse_target("10.0.0.1:11688") == Target("10.0.0.1", 11688)
    assert parse_target("[::1]:1700") == Target("::1", 1700)
    assert parse_target("::1") == Target("::1", 1688)
    assert str(Target("::1", 1700)) == "[::1]:1700"
    for bad in ("host:0", "host:x", ":1688", "[::1"):
        with pytest.raises(ValueError):
            parse_target(bad)


# ------------------------------------------------------------- misbehaving hosts

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[Target]:
    """A TCP server on an ephemeral loopback port running `handler` per connection."""
    srv = await asyncio.start_server(handler, LOOPBACK, 0)
    try:
        yield Target(LOOPBACK, srv.sockets[0].getsockname()[1])
    finally:
        srv.close()


async def read_one_pdu(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readexactly(16)
    return head + await reader.readexactly(int.from_bytes(head[8:10], "little") - 16)


async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # until the client gives up


async def closes_mid_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    bind = await read_one_pdu(reader)
    writer.write(bind[:30])  # the first 30 bytes of a PDU that says it has frag_length bytes
    await writer.drain()
    writer.close()


async def speaks_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(1)
    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    await writer.drain()
    await reader.read()


async def closes_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


@pytest.mark.system
@pytest.mark.parametrize(
    ("handler", "status", "message"),
    [
        (never_answers, Status.UNREACHABLE, "no answer within 0.5 s"),
        (closes_mid_reply, Status.UNREACHABLE, "in the middle of a reply (14 of"),
        (closes_at_once, Status.UNREACHABLE, "the host closed the connection"),
        (speaks_http, Status.NOT_GENUINE, "rpc_version: reply is not DCE-RPC 5.0"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
async def test_misbehaving_hosts(handler: Handler, status: Status, message: str) -> None:
    async with serve(handler) as target:
        code, out = await run_cli("activate", str(target), "--timeout", "0.5", "--json")
        data = json.loads(out)
        assert code == status and data["status"] == status.label
        assert message in data["error"]["message"], data["error"]


@pytest.mark.system
async def test_nothing_listening() -> None:
    async with serve(closes_at_once) as target:
        closed = target
    code, out = await run_cli("activate", str(closed), "--timeout", "2")
    assert code == Status.UNREACHABLE and "connection refused" in out


# ------------------------------------------------ captured exchanges, replayed and tampered


def load_vector(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / f"{name}.json").read_text())
    return data


def replayable() -> list[str]:
    """Captures of a vlmcs-like client whose first call got a KMS response."""
    names = []
    for path in sorted(VECTORS.glob("*.json")):
        if not re.match(r"(v[456]_|pykms_|srvN0B0_|port)", path.stem):
            continue
        decoded = [d for d in load_vector(path.stem)["decoded"] if d["connection"] == 0]
        first = next(i for i, d in enumerate(decoded) if d["header"]["ptype"] == "request")
        if "kms_response_decoded" in decoded[first + 1]:
            names.append(path.stem)
    return names


class Script:
    """Connection 0 of a capture up to its first response: the client PDUs expected and
    the server PDUs that answer each."""

    def __init__(self, vector: dict[str, Any]) -> None:
        self.steps: list[tuple[bytes, list[bytes]]] = []
        for pdu, dec in zip(vector["pdus"], vector["decoded"], strict=True):
            if pdu["connection"] != 0:
                continue
            data = bytes.fromhex(pdu["hex"])
            if pdu["dir"] == "c2s":
                self.steps.append((data, []))
            else:
                self.steps[-1][1].append(data)
            if "kms_response_decoded" in dec:
                self.response = dec
                break
            if "kms_request_decoded" in dec:
                raw = bytes.fromhex(dec["kms_request_hex"])
                req = decode_request(raw)
                self.prepared = PreparedRequest(req.base, req.iv, raw)
                self.ndr64 = dec["stub"]["syntax"] == "NDR64"
        bind = parse_pdu(self.steps[0][0])
        assert isinstance(bind, Bind)
        syntaxes = [c.transfers[0] for c in bind.contexts]
        self.options = BindOptions(
            ndr64=NDR64 in syntaxes,
            btfn=any(btfn_features(s) is not None for s in syntaxes),
            multiplex=bool(bind.flags & Flags.CONC_MPX),
        )
        self.payload_at = 24 + self.response["stub"]["data_offset_in_stub"]
        self.payload = bytes.fromhex(self.response["kms_response_hex"])


async def replay(script: Script, tamper: Callable[[bytes], bytes]) -> tuple[Any, list[bytes]]:
    """Run the client against a server that answers with the recorded PDUs, the KMS
    response passed through `tamper`; returns the result and what the client sent."""
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _expected, answers in script.steps:
            received.append(await read_one_pdu(reader))
            for answer in answers:
                if answer is script.steps[-1][1][-1]:
                    at = script.payload_at
                    body = tamper(script.payload)
                    assert len(body) == len(script.payload)
                    answer = answer[:at] + body + answer[at + len(body) :]
                writer.write(answer)
        await writer.drain()
        await reader.read()

    async with serve(handler) as target:
        activator = Activator(target, CallOptions(script.options, script.ndr64, TIMEOUT))
        try:
            result = await activator.run(script.prepared)
        finally:
            await activator.close()
    return result, received


def flip(offset: int) -> Callable[[bytes], bytes]:
    return lambda data: data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


def wire_fields(major: int, p: int) -> dict[str, int]:
    """Where each field of a response is on the wire (V5/V6: the ciphertext bytes that
    decrypt to its first byte)."""
    head = {"version": 0, "epid_size": 4, "epid": 8, "client_machine_id": 8 + p,
            "request_time": 24 + p, "count": 32 + p, "activation_interval": 36 + p,
            "renewal_interval": 40 + p}  # fmt: skip
    if major == 4:
        return {**head, "mac": 44 + p}
    body = {**head, "salt_xor": 44 + p, "hash": 60 + p}
    if major == 6:
        body |= {"hwid": 92 + p, "xored_ivs": 100 + p, "hmac": 116 + p}
    body["pkcs7_pad"] = 44 + p + (48 if major == 5 else 88)
    return {"outer_version": 0, "response_iv": 4} | {k: 20 + v for k, v in body.items()}


def expected_check(major: int, p: int, size: int, field: str, at: int) -> str:
    """The first check that a one-bit flip at `at` breaks, in the order a client makes
    them (kms.decode_response, then the ePID's structure)."""
    if major == 4:
        return "epid" if field == "epid_size" else "mac"
    if field == "outer_version":
        return "version"
    body_len = 44 + p + (48 if major == 5 else 88)
    if field == "response_iv":  # plaintext block 0 gets the flip; V6 P0 = D(W) changes
        return "response_iv" if major == 5 else "hmac"
    o = at - 20  # CBC: a flip in ciphertext block k garbles block k, flips o+16 in k+1
    garbled = set(range(o // 16 * 16, o // 16 * 16 + 16))
    touched = garbled | {o + 16}
    if o // 16 == (size - 20) // 16 - 1 or o + 16 >= body_len:
        return "decrypt"

    def hit(start: int, end: int) -> bool:
        return bool(touched & set(range(start, end)))

    if hit(4, 8) or hit(6 + p, 8 + p):
        return "epid"
    if hit(44 + p, 92 + p):
        return "hash"
    if major == 6:
        return "xored_ivs" if hit(100 + p, 116 + p) else "hmac"
    for check, start, end in (
        ("version", 0, 4), ("client_machine_id", 8 + p, 24 + p), ("request_time", 24 + p, 32 + p),
        ("epid_format", 8, 6 + p),
    ):  # fmt: skip
        if hit(start, end):
            return check
    raise AssertionError(f"flip at {at} touches nothing V5 checks")


@pytest.mark.system
@pytest.mark.parametrize("name", replayable())
async def test_replayed_capture_verifies_and_every_tampered_field_is_caught(name: str) -> None:
    script = Script(load_vector(name))
    result, sent = await replay(script, lambda data: data)
    assert result.verified is not None, result.failure
    assert (
        result.verified.reply.base.epid == script.response["kms_response_decoded"]["base"]["epid"]
    )
    assert sent == [c for c, _ in script.steps], "the client should send what vlmcs sent"
    major, p = (
        script.prepared.base.major,
        script.response["kms_response_decoded"]["base"]["epid_size_bytes"],
    )
    for field, at in wire_fields(major, p).items():
        result, _ = await replay(script, flip(at))
        want = expected_check(major, p, len(script.payload), field, at)
        assert result.status == Status.NOT_GENUINE, (field, result)
        assert result.failure is not None and result.failure.check == want, (field, result)


# Semantic tampering: a host that holds the keys and lies in one field of the plaintext.

V6_VECTOR = "v6_win-client_N1_B1"
V5_VECTOR = "v5_win-client_N1_B1"


def plain_parts(name: str) -> tuple[PreparedRequest, bytes, bytes, int]:
    script = Script(load_vector(name))
    major = script.prepared.base.major
    cipher = E6 if major == 6 else E5
    w = script.payload[4:20]
    body = pkcs7_unpad(cipher.cbc_decrypt(w, script.payload[20:]))
    assert body is not None
    p = int.from_bytes(body[4:8], "little")
    return script.prepared, script.payload[:20], body, p


def reseal(head: bytes, body: bytes, *, resign: bool) -> bytes:
    major = head[2]
    cipher = E6 if major == 6 else E5
    if resign and major == 6:
        p = int.from_bytes(body[4:8], "little")
        time = struct.unpack_from("<Q", body, 24 + p)[0]
        body = body[:-16] + v6_mac(time, cipher.decrypt_block(head[4:20]) + body[:-16])
    return head + cipher.cbc_encrypt(head[4:20], pkcs7_pad(body))


def edit(body: bytes, at: int, value: bytes) -> bytes:
    return body[:at] + value + body[at + len(value) :]


@pytest.mark.parametrize(
    ("name", "field", "resign", "check"),
    [
        (V5_VECTOR, "salt_xor", False, "hash"),
        (V5_VECTOR, "hash", False, "hash"),
        (V5_VECTOR, "version", False, "version"),
        (V5_VECTOR, "client_machine_id", False, "client_machine_id"),
        (V5_VECTOR, "request_time", False, "request_time"),
        (V5_VECTOR, "epid", False, "epid_format"),
        (V5_VECTOR, "epid_nul", False, "epid"),
        (V6_VECTOR, "salt_xor", False, "hash"),
        (V6_VECTOR, "hash", False, "hash"),
        (V6_VECTOR, "xored_ivs", False, "xored_ivs"),
        (V6_VECTOR, "hmac", False, "hmac"),
        (V6_VECTOR, "hwid", False, "hmac"),
        (V6_VECTOR, "count", False, "hmac"),
        (V6_VECTOR, "version", True, "version"),
        (V6_VECTOR, "client_machine_id", True, "client_machine_id"),
        (V6_VECTOR, "request_time", True, "request_time"),
        (V6_VECTOR, "epid", True, "epid_format"),
    ],
)
def test_a_host_with_the_keys_that_lies_in_one_field(
    name: str, field: str, resign: bool, check: str
) -> None:
    prepared, head, body, p = plain_parts(name)
    offsets = {"version": 2, "epid": 8, "epid_nul": 6 + p, "client_machine_id": 8 + p,
               "request_time": 24 + p, "count": 32 + p, "salt_xor": 44 + p, "hash": 60 + p,
               "hwid": 92 + p, "xored_ivs": 100 + p, "hmac": 116 + p}  # fmt: skip
    at = offsets[field]
    # An ePID starting with "X", or one whose terminating NUL is replaced by "X".
    value = b"X\x00" if field in ("epid", "epid_nul") else bytes([body[at] ^ 0x01])
    tampered = reseal(head, edit(body, at, value), resign=resign)
    assert verify_reply(prepared.base, prepared.iv, reseal(head, body, resign=False))
    with pytest.raises(NotGenuine) as caught:
        verify_reply(prepared.base, prepared.iv, tampered)
    assert caught.value.check == check


def test_v5_response_iv_must_echo_the_request_iv() -> None:
    prepared, head, body, _ = plain_parts(V5_VECTOR)
    other = head[:4] + bytes(16)
    with pytest.raises(NotGenuine) as caught:
        verify_reply(prepared.base, prepared.iv, reseal(other, body, resign=False))
    assert caught.value.check == "response_iv"


# ----------------------------------------------------- RPC checks of a strict client


def vlmcs_client(name: str) -> tuple[RpcClient, bytes]:
    """A client bound as in the capture, and the capture's first response PDU."""
    script = Script(load_vector(name))
    client = RpcClient(script.options)
    assert client.bind() == script.steps[0][0]
    client.on_bind_ack(script.steps[0][1][0])
    if client.needs_alter_context:
        assert client.alter_context() == script.steps[1][0]
        client.on_alter_context_resp(script.steps[1][1][0])
    return client, script.steps[-1][1][0]


def put(pdu: bytes, at: int, fmt: str, value: int) -> bytes:
    data = bytearray(pdu)
    struct.pack_into(fmt, data, at, value)
    return bytes(data)


@pytest.mark.parametrize(
    ("at", "fmt", "value", "check"),
    [
        (2, "<B", 12, "rpc_ptype"),
        (3, "<B", 0x01, "rpc_frag_flags"),
        (12, "<I", 7, "rpc_call_id"),
        (22, "<B", 1, "rpc_cancel_count"),
        (20, "<H", 1, "rpc_context_id"),
        (24, "<I", 259, "ndr_size"),  # responseSize differs from the conformance
    ],
)
def test_response_pdu_checks(at: int, fmt: str, value: int, check: str) -> None:
    client, response = vlmcs_client("v6_win-client_N1_B1")
    with pytest.raises(NotGenuine) as caught:
        client.on_response(put(response, at, fmt, value), 0, False)
    assert caught.value.check == check


@pytest.mark.parametrize(
    ("at", "fmt", "value", "check"),
    [(0, "<B", 4, "rpc_version"), (1, "<B", 1, "rpc_version"), (4, "<I", 0, "rpc_drep"),
     (10, "<H", 8, "rpc_auth_length"), (8, "<H", 9, "rpc_frag_length")],
)  # fmt: skip
def test_header_checks_come_before_the_body_is_read(
    at: int, fmt: str, value: int, check: str
) -> None:
    _, response = vlmcs_client("v6_win-client_N1_B1")
    with pytest.raises(NotGenuine) as caught:
        check_header(put(response, at, fmt, value)[:16])
    assert caught.value.check == check


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "check"),
    [
        (32, "<B", 2, "bind_results"),  # n_results
        (60, "<H", 1, "bind_result"),  # ctx 1 (NDR64) user_rejection
        (64, "<B", 0x34, "bind_syntax"),  # ctx 1 accepted another UUID
        (80, "<I", 2, "bind_syntax_version"),
        (60, "<H", 2, "bind_no_syntax"),  # NDR64 refused too
    ],
)
def test_bind_ack_checks(offset: int, fmt: str, value: int, check: str) -> None:
    script = Script(load_vector("v6_win-client_N1_B1"))
    client = RpcClient(script.options)
    client.bind()
    with pytest.raises(NotGenuine) as caught:
        client.on_bind_ack(put(script.steps[0][1][0], offset, fmt, value))
    assert caught.value.check == check


def test_bind_ack_warnings_like_vlmcs() -> None:
    script = Script(load_vector("v6_win-client_N1_B1"))
    client = RpcClient(script.options)
    client.bind()
    ack = put(script.steps[0][1][0], 86, "<H", 1)  # BTFN reason 1 instead of 3
    client.on_bind_ack(put(ack, 3, "<B", 0x03))  # and PFC_CONC_MPX not echoed
    assert len(client.warnings) == 2


@pytest.mark.system
def test_version() -> None:
    import subprocess
    import sys

    from kmsd import __version__

    result = subprocess.run(
        [sys.executable, "-m", "kmsclient", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.strip() == f"kmsclient {__version__}"
