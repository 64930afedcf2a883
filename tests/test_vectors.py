"""The captured exchanges of tests/fixtures/vectors (copied from shared/vectors).

Every PDU decodes to what the capture's independent dissector says; every KMS request
decodes; and replaying each client stream into kmsd's connection and host, with the
recorded random values, reproduces the server's stream byte for byte, except where the
recorded server had a bug that kmsd does not copy (docs/protocol.md, Where other
implementations differ) (each such patch is
listed in `known_deviations`).
"""

from __future__ import annotations

import datetime as dt
import json
import struct
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from kmsd.host import HostIdentity, HostPolicy, KmsHost
from kmsd.protocol.connection import AssociationGroups, Call, Close, Send, ServerConnection
from kmsd.protocol.errors import FaultStatus, KmsError
from kmsd.protocol.kms import BaseRequest, decode_request, guid_text, product_uuid
from kmsd.protocol.rpc import (
    BindAck,
    Fault,
    OtherPdu,
    PType,
    Request,
    Response,
    parse_pdu,
)

VECTORS = sorted((Path(__file__).parent / "fixtures" / "vectors").glob("*.json"))
PTYPES = {
    "request": PType.REQUEST,
    "response": PType.RESPONSE,
    "fault": PType.FAULT,
    "bind": PType.BIND,
    "bind_ack": PType.BIND_ACK,
    "alter_context": PType.ALTER_CONTEXT,
    "alter_context_resp": PType.ALTER_CONTEXT_RESP,
}


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


@pytest.mark.parametrize("path", VECTORS, ids=ids(VECTORS))
def test_every_pdu_decodes_as_captured(path: Path) -> None:
    vector = load(path)
    for pdu_hex, dec in zip((p["hex"] for p in vector["pdus"]), vector["decoded"], strict=True):
        pdu = parse_pdu(bytes.fromhex(pdu_hex))
        head, body = dec["header"], dec["body"]
        assert head["frag_length"] == len(pdu_hex) // 2
        assert not isinstance(pdu, OtherPdu)
        assert int(str(head["pfc_flags"]), 0) == pdu.flags  # type: ignore[union-attr]
        assert head["call_id"] == pdu.call_id
        kind = head["ptype"]
        if kind in ("bind", "alter_context"):
            assert [c.context_id for c in pdu.contexts] == [  # type: ignore[union-attr]
                c["p_cont_id"] for c in body["context_items"]
            ]
            assert pdu.max_xmit_frag == body["max_xmit_frag"]  # type: ignore[union-attr]
            assert pdu.assoc_group == body["assoc_group_id"]  # type: ignore[union-attr]
        elif kind in ("bind_ack", "alter_context_resp"):
            assert isinstance(pdu, BindAck)
            assert pdu.assoc_group == body["assoc_group_id"]
            assert pdu.sec_addr.decode() == body.get("sec_addr", "")
            assert [
                (r.result, r.reason, str(UUID(bytes_le=r.syntax.uuid))) for r in pdu.results
            ] == [(r["result"], r["reason"], r["transfer_syntax"]) for r in body["results"]]
        elif kind == "request":
            assert isinstance(pdu, Request)
            assert (pdu.alloc_hint, pdu.context_id, pdu.opnum) == (
                body["alloc_hint"],
                body["p_cont_id"],
                body["opnum"],
            )
        elif kind == "response":
            assert isinstance(pdu, Response)
            assert (pdu.alloc_hint, pdu.context_id) == (body["alloc_hint"], body["p_cont_id"])
        elif kind == "fault":
            assert isinstance(pdu, Fault)
            assert pdu.status == int(body["status"], 16)
        else:
            pytest.fail(f"unexpected PDU type {kind}")


@pytest.mark.parametrize("path", VECTORS, ids=ids(VECTORS))
def test_every_kms_request_decodes(path: Path) -> None:
    for dec in load(path)["decoded"]:
        if "kms_request_decoded" not in dec:
            continue
        raw = bytes.fromhex(dec["kms_request_hex"])
        want = dec["kms_request_decoded"]
        if (
            want.get("base") is None
            or (want["kms_major"], want["kms_minor"]) not in ((4, 0), (5, 0), (6, 0))
            or len(raw) < (252 if want["kms_major"] == 4 else 260)
        ):
            with pytest.raises(KmsError):
                decode_request(raw)
            continue
        req = decode_request(raw)
        base = want["base"]
        raw_base = raw[:236] if req.major == 4 else bytes.fromhex(want["plaintext_base_hex"])
        if base["workstation_buffer_tail_all_zero"]:  # else vlmcs left garbage after the NUL
            assert req.base.encode() == raw_base
        assert req.base.cmid_text == base["client_machine_id"]
        assert guid_text(req.base.application_id) == base["application_id"]
        assert guid_text(req.base.sku_id) == base["sku_id"]
        assert guid_text(req.base.kms_id) == base["kms_counted_id"]
        assert req.base.required_count == base["required_client_count"]
        assert req.base.request_time == base["request_time_filetime"]
        assert req.base.workstation == base["workstation_name"]
        assert req.base.is_vm == base["is_client_vm"]
        assert req.base.license_status == base["license_status"]
        assert req.base.binding_expiration == base["binding_expiration_minutes"]
        assert guid_text(req.base.previous_client_machine_id) == base["previous_client_machine_id"]
        if req.major >= 5:
            assert req.dc.hex() == want["decrypted_iv_block_hex"]


@dataclass
class Recorded:
    """Replays the values a capture recorded: the count and the random bytes drawn."""

    counts: deque[int]
    randoms: deque[bytes]

    def count(self, request: BaseRequest, now: float, address: str) -> int:
        return self.counts.popleft()

    def random(self, n: int) -> bytes:
        value = b""  # the recorded randoms in the order drawn (V6: salt, then IV)
        while len(value) < n:
            value += self.randoms.popleft()
        assert len(value) == n
        return value


def server_options(vector: dict[str, Any]) -> tuple[HostPolicy, bool, bool, int]:
    """Policy, NDR64, BTFN and port of the server that made the capture."""
    cmd = vector["server"]["command_line"].split()
    port = int(vector["server"]["listen"].rpartition(":")[2])
    if cmd[0].startswith("pykms"):  # py-kms: NDR32 only, BTFN acknowledged
        return HostPolicy(), False, True, port
    policy = HostPolicy(strict="-K3" in cmd, max_clock_skew=4 * 3600 if "-c1" in cmd else None)
    return policy, "-N0" not in cmd, "-B0" not in cmd, port


def known_deviations(vector: dict[str, Any], index: int, expected: bytes, request: bytes) -> bytes:
    """Patch a recorded server PDU where the recorded server is wrong (docs/protocol.md,
    "Where other implementations differ")."""
    dec = vector["decoded"][index]
    kind = dec["header"]["ptype"]
    out = bytearray(expected)
    if kind == "alter_context_resp" and vector["server"]["program"].startswith("vlmcsd"):
        out[26:28] = b"\x00\x00"  # vlmcsd: uninitialised pad after the empty sec_addr
    if kind == "fault":
        out[12:16] = request[12:16]  # vlmcsd: constant call_id 2 instead of the request's
        out[22:24] = b"\x00\x00"  # vlmcsd: uninitialised cancel_count and reserved byte
        out[20:22] = request[20:22]  # p_cont_id: vlmcsd 0; we echo the request's
    if kind == "bind_ack" and vector["name"].startswith("pykms"):
        out[3] = (out[3] & ~0x10) | (request[3] & 0x10)  # py-kms: always sets CONC_MPX
    return bytes(out)


def replay(vector: dict[str, Any]) -> list[tuple[int, bytes, bytes]]:
    """Feed every client PDU to kmsd; returns (index, expected, actual) per server PDU."""
    policy, ndr64, btfn, port = server_options(vector)
    decoded = vector["decoded"]
    counts: deque[int] = deque()
    randoms: deque[bytes] = deque()
    overrides: dict[UUID, str] = {}
    for dec in decoded:
        resp = dec.get("kms_response_decoded")
        if resp and resp.get("base"):
            counts.append(resp["base"]["current_client_count"])
            if resp["kms_major"] >= 5:
                randoms.append(bytes.fromhex(resp["random_hex"]))
            if resp["kms_major"] >= 6:
                randoms.append(bytes.fromhex(resp["iv"]))
    recorded = Recorded(counts, randoms)
    hwid = next(
        (
            bytes.fromhex(d["kms_response_decoded"]["hwid_hex"])
            for d in decoded
            if d.get("kms_response_decoded", {}).get("hwid_hex")
        ),
        bytes(8),
    )
    identity = HostIdentity(hwid=hwid, overrides=overrides)
    host = KmsHost(recorded, identity, policy, random=recorded.random)
    now = dt.datetime.fromisoformat(vector["captured_utc"].replace("Z", "+00:00")).timestamp()

    connections: dict[int, ServerConnection] = {}
    out: list[tuple[int, bytes, bytes]] = []
    produced: deque[bytes] = deque()
    last_request = b""
    for i, (pdu, dec) in enumerate(zip(vector["pdus"], decoded, strict=True)):
        data = bytes.fromhex(pdu["hex"])
        if pdu["dir"] == "c2s":
            assert not produced, f"kmsd sent more PDUs than the server did before PDU {i}"
            conn = connections.get(pdu["connection"])
            if conn is None:
                ack = next(d for d in decoded[i:] if d["header"]["ptype"] == "bind_ack")
                groups = AssociationGroups(ack["body"]["assoc_group_id"])
                conn = connections[pdu["connection"]] = ServerConnection(
                    port=port, groups=groups, ndr64=ndr64, btfn=btfn
                )
            nxt = decoded[i + 1] if i + 1 < len(decoded) else {}
            resp = nxt.get("kms_response_decoded") or {}
            if resp.get("base"):
                raw_kms_id = decode_request(bytes.fromhex(dec["kms_request_hex"])).base.kms_id
                kms_id = product_uuid(raw_kms_id)
                overrides[kms_id] = resp["base"]["epid"]
            for event in conn.feed(data):
                if isinstance(event, Send):
                    produced.extend(split_pdus(event.data))
                elif isinstance(event, Call):
                    try:
                        payload, _ = host.answer(event.payload, now)
                        produced.append(event.reply(payload))
                    except KmsError as exc:
                        produced.append(event.reply_error(exc.hresult))
                else:
                    assert isinstance(event, Close)
            last_request = data
        else:
            assert produced, f"kmsd sent nothing where the server sent PDU {i}"
            out.append((i, known_deviations(vector, i, data, last_request), produced.popleft()))
    assert not produced
    assert not counts and not randoms, "not every recorded value was used"
    return out


def split_pdus(data: bytes) -> list[bytes]:
    pdus = []
    while data:
        length = struct.unpack_from("<H", data, 8)[0]
        pdus.append(data[:length])
        data = data[length:]
    return pdus


REPLAYED = [p for p in VECTORS if p.stem != "probe_opnum1"]


@pytest.mark.parametrize("path", REPLAYED, ids=ids(REPLAYED))
def test_replay_reproduces_server_stream(path: Path) -> None:
    vector = load(path)
    for index, expected, actual in replay(vector):
        assert actual.hex() == expected.hex(), f"PDU {index} ({path.stem})"


def test_opnum_1_gets_a_fault_where_vlmcsd_executed_it() -> None:
    vector = load(next(p for p in VECTORS if p.stem == "probe_opnum1"))
    request = next(
        bytes.fromhex(p["hex"])
        for p in vector["pdus"]
        if parse_pdu(bytes.fromhex(p["hex"])).__class__ is Request
    )
    conn = ServerConnection(port=1688, groups=AssociationGroups(1))
    events = conn.feed(bytes.fromhex(vector["pdus"][0]["hex"]))
    assert isinstance(events[0], Send)
    events = conn.feed(request)
    assert len(events) == 1 and isinstance(events[0], Send)
    fault = parse_pdu(events[0].data)
    assert isinstance(fault, Fault)
    assert fault.status == FaultStatus.OP_RNG_ERROR
    assert fault.call_id == parse_pdu(request).call_id  # type: ignore[union-attr]
