"""kmsd against an independent DCE-RPC client: impacket's own PDU encoder and decoder.

impacket builds the bind, alter_context and request PDUs, fragments requests, decodes
responses and raises on faults and rejected binds; kmsd runs as a subprocess because
impacket blocks. Only the KMS message and its NDR stub come from kmsd.protocol, and each
reply is checked the way a strict client checks it (MAC, hash, HMAC, echoed fields).
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from impacket.dcerpc.v5 import rpcrt, transport
from impacket.uuid import uuidtup_to_bin

from kmsd.protocol import kms, ndr
from kmsd.protocol.client import base_request
from kmsd.protocol.kms import BaseRequest, KmsResponse
from tests.conftest import KmsdProcess, sku

KMS_INTERFACE = uuidtup_to_bin(("51c82175-844e-4750-b0d8-ec255555bc06", "1.0"))
NDR32 = ("8a885d04-1ceb-11c9-9fe8-08002b104860", "2.0")
NDR64 = ("71710533-beba-4937-8319-b5dbef9ccc36", "1.0")
UNKNOWN_INTERFACE = uuidtup_to_bin(("12345678-1234-abcd-ef00-0123456789ab", "1.0"))
NCA_S_OP_RNG_ERROR = 0x1C010002
NCA_S_UNK_IF = 0x1C010003
TIMEOUT = 10  # seconds; impacket puts it on the socket, so it bounds every read

SKU = sku("Windows 10/11 Enterprise")
assert SKU is not None


@dataclass
class Wire:
    """The raw PDUs impacket sent and received on one connection."""

    sent: list[bytes] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)

    def received_pdus(self) -> list[bytes]:
        data, out = bytes(self.received), []
        while len(data) >= 16:
            length = struct.unpack_from("<H", data, 8)[0]
            assert 16 <= length <= len(data), f"bad frag_length {length}: {data.hex()}"
            out.append(data[:length])
            data = data[length:]
        assert not data, f"{len(data)} bytes after the last whole PDU: {data.hex()}"
        return out


@dataclass
class Client:
    dce: rpcrt.DCERPC_v5
    wire: Wire

    def activate(self, base: BaseRequest, ndr64: bool) -> KmsResponse:
        """One RequestActivation call (opnum 0), the reply decoded and verified."""
        iv = os.urandom(16)
        self.dce.call(0, ndr.wrap_request(kms.encode_request(base, iv=iv), ndr64))
        payload, status = ndr.unwrap_response(self.dce.recv(), ndr64)
        assert status == 0, f"HRESULT 0x{status:08X}"
        return kms.decode_response(base, iv, payload)


def connect(kmsd: KmsdProcess) -> Client:
    rpc_transport = transport.DCERPCTransportFactory(f"ncacn_ip_tcp:{kmsd.host}[{kmsd.port}]")
    rpc_transport.set_connect_timeout(TIMEOUT)
    wire = Wire()
    send, recv = rpc_transport.send, rpc_transport.recv

    def recording_send(data: bytes, forceWriteAndx: int = 0, forceRecv: int = 0) -> None:
        wire.sent.append(bytes(data))
        send(data, forceWriteAndx, forceRecv)

    def recording_recv(forceRecv: int = 0, count: int = 0) -> bytes:
        data: bytes = recv(forceRecv, count)
        wire.received += data
        return data

    rpc_transport.send, rpc_transport.recv = recording_send, recording_recv
    dce = rpc_transport.get_dce_rpc()
    dce.connect()
    return Client(dce, wire)


@pytest.fixture
def clients(kmsd_process: KmsdProcess) -> Iterator[list[Client]]:
    """Connections opened with connect(kmsd_process); disconnected at the end."""
    opened: list[Client] = []
    yield opened
    for client in opened:
        client.dce.disconnect()


def fault_status(pdu: bytes) -> int:
    """The status of a fault PDU, read with impacket's own header structures."""
    header = rpcrt.MSRPCRespHeader(pdu)
    assert header["type"] == rpcrt.MSRPC_FAULT, header["type"]
    return int(struct.unpack("<L", header["pduData"][:4])[0])


@pytest.mark.parametrize("ndr64", [False, True], ids=["NDR32", "NDR64"])
def test_activate_v4_v5_v6(kmsd_process: KmsdProcess, clients: list[Client], ndr64: bool) -> None:
    client = connect(kmsd_process)
    clients.append(client)
    client.dce.bind(KMS_INTERFACE, transfer_syntax=NDR64 if ndr64 else NDR32)
    assert client.dce.transfer_syntax == uuidtup_to_bin(NDR64 if ndr64 else NDR32)

    for expected_count, major in enumerate((4, 5, 6), start=1):
        base = base_request(SKU, major=major, client_machine_id=uuid.uuid4())
        reply = client.activate(base, ndr64)
        assert reply.base.major == major
        assert reply.base.count == expected_count
        assert reply.warnings == ()

    bind, *requests = client.wire.sent
    assert rpcrt.MSRPCHeader(bind)["type"] == rpcrt.MSRPC_BIND
    bind_ack, *responses = client.wire.received_pdus()
    ack = rpcrt.MSRPCBindAck(bind_ack)
    assert ack["type"] == rpcrt.MSRPC_BINDACK
    assert ack["SecondaryAddr"] == str(kmsd_process.port)
    assert ack["SecondaryAddrLen"] == len(str(kmsd_process.port)) + 1
    assert [len(requests), len(responses)] == [3, 3]
    for request, response in zip(requests, responses, strict=True):
        sent, got = rpcrt.MSRPCRequestHeader(request), rpcrt.MSRPCRespHeader(response)
        assert got["type"] == rpcrt.MSRPC_RESPONSE
        assert got["flags"] == rpcrt.PFC_FIRST_FRAG | rpcrt.PFC_LAST_FRAG
        assert (got["call_id"], got["ctx_id"]) == (sent["call_id"], sent["ctx_id"])
        assert got["alloc_hint"] == len(got["pduData"])


@pytest.mark.parametrize("ndr64", [False, True], ids=["NDR32", "NDR64"])
def test_fragmented_request(kmsd_process: KmsdProcess, clients: list[Client], ndr64: bool) -> None:
    """impacket sends each call in fragments of 64 stub bytes; kmsd reassembles them and
    answers each call with one response PDU."""
    client = connect(kmsd_process)
    clients.append(client)
    client.dce.bind(KMS_INTERFACE, transfer_syntax=NDR64 if ndr64 else NDR32)
    client.dce.set_max_fragment_size(64)

    for expected_count, major in enumerate((6, 5), start=1):
        sent_before = len(client.wire.sent)
        reply = client.activate(base_request(SKU, major=major), ndr64)
        assert reply.base.count == expected_count

        fragments = [rpcrt.MSRPCRequestHeader(p) for p in client.wire.sent[sent_before:]]
        assert len(fragments) >= 3, f"expected several fragments, got {len(fragments)}"
        first, last = rpcrt.PFC_FIRST_FRAG, rpcrt.PFC_LAST_FRAG
        flags = [f["flags"] & (first | last) for f in fragments]
        assert flags == [first] + [0] * (len(fragments) - 2) + [last]
        assert all(len(f["pduData"]) <= 64 for f in fragments)
        assert len({f["call_id"] for f in fragments}) == 1

        response = rpcrt.MSRPCRespHeader(client.wire.received_pdus()[-1])
        assert response["type"] == rpcrt.MSRPC_RESPONSE
        assert response["flags"] == first | last
        assert response["call_id"] == fragments[0]["call_id"]
    assert len(client.wire.received_pdus()) == 1 + 2  # bind_ack and two whole responses


def test_faults_and_rejections_then_service(
    kmsd_process: KmsdProcess, clients: list[Client]
) -> None:
    client = connect(kmsd_process)
    clients.append(client)
    stub = ndr.wrap_request(
        kms.encode_request(base_request(SKU, major=6), iv=os.urandom(16)), False
    )

    # A bind to an interface kmsd does not serve: impacket refuses the bind_ack.
    with pytest.raises(rpcrt.DCERPCException, match="abstract_syntax_not_supported"):
        client.dce.bind(UNKNOWN_INTERFACE)
    # impacket skips taking max_xmit_frag from a bind_ack it refuses; without it, its
    # next request would go out as a lone first fragment.
    client.dce.set_max_tfrag(rpcrt.MSRPCBindAck(client.wire.received_pdus()[-1])["max_rfrag"])
    # Nothing is bound on context 0 yet: the call is answered with nca_s_unk_if.
    client.dce.call(0, stub)
    with pytest.raises(rpcrt.DCERPCException, match=r"^nca_s_unk_if$"):
        client.dce.recv()
    assert fault_status(client.wire.received_pdus()[-1]) == NCA_S_UNK_IF

    # alter_context on the same connection binds KMS; opnum 1 does not exist.
    client.dce.bind(KMS_INTERFACE, alter=1)
    assert rpcrt.MSRPCHeader(client.wire.received_pdus()[-1])["type"] == rpcrt.MSRPC_ALTERCTX_R
    client.dce.call(1, stub)
    with pytest.raises(rpcrt.DCERPCException, match=r"^nca_s_op_rng_error$"):
        client.dce.recv()
    assert fault_status(client.wire.received_pdus()[-1]) == NCA_S_OP_RNG_ERROR

    # The same connection, then a new one, still get verified replies.
    assert client.activate(base_request(SKU, major=6), False).base.count == 1
    fresh = connect(kmsd_process)
    clients.append(fresh)
    fresh.dce.bind(KMS_INTERFACE, transfer_syntax=NDR64)
    assert fresh.activate(base_request(SKU, major=5), True).base.count == 2
    assert kmsd_process.process.poll() is None
