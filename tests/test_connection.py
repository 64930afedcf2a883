"""The server side of a DCE-RPC connection: negotiation, reassembly and every kind of bad input."""

from __future__ import annotations

import os
import struct

import pytest

from kmsd.metrics import Metrics
from kmsd.protocol import ndr
from kmsd.protocol.client import BindOptions, RpcClient, base_request
from kmsd.protocol.connection import (
    AssociationGroups,
    BindAnswers,
    Call,
    Close,
    Event,
    Send,
    ServerConnection,
)
from kmsd.protocol.errors import FaultStatus, HResult
from kmsd.protocol.kms import encode_request
from kmsd.protocol.products import products
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
    NakReason,
    PType,
    Reason,
    Request,
    Response,
    Result,
    Syntax,
    btfn_syntax,
    parse_pdu,
)

SKU = products().sku_by_name("Windows 10/11 Enterprise")
FOREIGN = Syntax.of("12345678-1234-4abc-8def-0123456789ab", 1)
UNKNOWN_TRANSFER = Syntax.of("0b0c0d0e-0000-0000-0000-000000000000", 1)


def kms_payload(major: int = 6) -> bytes:
    assert SKU
    return encode_request(base_request(SKU, major=major), iv=os.urandom(16))


def new_conn(**kwargs: object) -> ServerConnection:
    return ServerConnection(port=1688, groups=AssociationGroups(0x1000), **kwargs)  # type: ignore[arg-type]


def sent(events: list[Event]) -> list[object]:
    return [parse_pdu(e.data) for e in events if isinstance(e, Send)]


def bound(ndr64: bool = False) -> ServerConnection:
    conn = new_conn()
    transfer = NDR64 if ndr64 else NDR32
    (ack,) = sent(conn.feed(Bind(2, (ContextElement(0, KMS_INTERFACE, (transfer,)),)).encode()))
    assert isinstance(ack, BindAck) and ack.results[0].result == Result.ACCEPTANCE
    return conn


def only(events: list[Event], kind: type) -> object:
    assert len(events) == 1 and isinstance(events[0], kind), events
    return events[0]


def test_full_vlmcs_style_negotiation() -> None:
    conn = new_conn()
    client = RpcClient()
    (ack,) = sent(conn.feed(client.bind()))
    assert isinstance(ack, BindAck)
    assert [(r.result, r.reason, r.syntax) for r in ack.results] == [
        (Result.PROVIDER_REJECTION, Reason.TRANSFER_SYNTAXES_NOT_SUPPORTED, Syntax(bytes(16), 0)),
        (Result.ACCEPTANCE, 0, NDR64),
        (Result.NEGOTIATE_ACK, 3, Syntax(bytes(16), 0)),
    ]
    assert ack.sec_addr == b"1688" and ack.assoc_group == 0x1000
    assert ack.flags == WHOLE | Flags.CONC_MPX
    alter = Bind(2, (ContextElement(0, KMS_INTERFACE, (NDR32,)),), alter=True)
    (resp,) = sent(conn.feed(alter.encode()))
    assert isinstance(resp, BindAck) and resp.alter
    assert resp.flags == WHOLE and resp.sec_addr == b"" and resp.assoc_group == 0x1000
    assert resp.results[0].result == Result.ACCEPTANCE and resp.results[0].syntax == NDR32
    # Both contexts now work: ctx 0 NDR32 and ctx 1 NDR64.
    for ctx, ndr64 in ((0, False), (1, True)):
        req = Request(3, ctx, ndr.wrap_request(b"x" * 260, ndr64)).encode()
        call = only(conn.feed(req), Call)
        assert isinstance(call, Call) and call.ndr64 is ndr64 and call.payload == b"x" * 260


def test_without_ndr64_support_ndr32_is_accepted_and_btfn_refused() -> None:
    conn = new_conn(ndr64=False, btfn=False)
    (ack,) = sent(conn.feed(RpcClient().bind()))
    assert isinstance(ack, BindAck)
    assert [(r.result, r.reason) for r in ack.results] == [
        (Result.ACCEPTANCE, 0),
        (Result.PROVIDER_REJECTION, Reason.TRANSFER_SYNTAXES_NOT_SUPPORTED),
        (Result.PROVIDER_REJECTION, Reason.TRANSFER_SYNTAXES_NOT_SUPPORTED),
    ]


def test_foreign_interface_unknown_syntax_and_several_syntaxes_per_element() -> None:
    conn = new_conn()
    bind = Bind(
        7,
        (
            ContextElement(0, FOREIGN, (NDR32,)),
            ContextElement(1, KMS_INTERFACE, (UNKNOWN_TRANSFER,)),
            ContextElement(2, KMS_INTERFACE, (UNKNOWN_TRANSFER, NDR32)),
            ContextElement(3, KMS_INTERFACE, (btfn_syntax(1),)),
        ),
        flags=WHOLE,
    )
    (ack,) = sent(conn.feed(bind.encode()))
    assert isinstance(ack, BindAck)
    assert ack.call_id == 7 and ack.flags == WHOLE
    assert [(r.result, r.reason) for r in ack.results] == [
        (Result.PROVIDER_REJECTION, Reason.ABSTRACT_SYNTAX_NOT_SUPPORTED),
        (Result.PROVIDER_REJECTION, Reason.TRANSFER_SYNTAXES_NOT_SUPPORTED),
        (Result.ACCEPTANCE, 0),
        (Result.NEGOTIATE_ACK, 1),  # offered bits & supported bits
    ]


@pytest.mark.parametrize(
    ("version", "reason"),
    [
        ((4, 0), NakReason.PROTOCOL_VERSION_NOT_SUPPORTED),
        ((5, 1), NakReason.PROTOCOL_VERSION_NOT_SUPPORTED),
    ],
)
def test_bind_with_wrong_rpc_version_gets_bind_nak(version: tuple[int, int], reason: int) -> None:
    data = bytearray(RpcClient().bind())
    data[0:2] = bytes(version)
    events = new_conn().feed(bytes(data))
    nak = parse_pdu(events[0].data)  # type: ignore[union-attr]
    assert isinstance(nak, BindNak) and nak.reason == reason and nak.versions == ((5, 0),)
    assert nak.call_id == 2
    assert isinstance(events[1], Close)


def test_authenticated_and_truncated_and_big_endian_binds_get_bind_nak() -> None:
    auth = bytearray(RpcClient().bind())
    auth[10:12] = struct.pack("<H", 8)
    truncated = bytearray(RpcClient().bind()[:40])
    truncated[8:10] = struct.pack("<H", 40)
    big_endian = bytearray(RpcClient().bind())
    big_endian[4] = 0x00
    big_endian[8:10] = struct.pack(">H", len(big_endian))
    for data, reason in (
        (auth, NakReason.AUTHENTICATION_TYPE_NOT_RECOGNIZED),
        (truncated, NakReason.NOT_SPECIFIED),
        (big_endian, NakReason.NOT_SPECIFIED),
    ):
        events = new_conn().feed(bytes(data))
        assert isinstance(events[0], Send) and events[0].problem
        nak = parse_pdu(events[0].data)
        assert isinstance(nak, BindNak) and nak.reason == reason
        assert isinstance(events[1], Close)


def test_request_on_unbound_context_gets_fault_and_connection_goes_on() -> None:
    conn = bound()
    req = Request(9, 5, ndr.wrap_request(kms_payload(), False)).encode()
    send = only(conn.feed(req), Send)
    fault = parse_pdu(send.data)  # type: ignore[attr-defined]
    assert isinstance(fault, Fault)
    assert (fault.status, fault.call_id, fault.context_id) == (FaultStatus.UNK_IF, 9, 5)
    assert fault.flags == WHOLE | Flags.DID_NOT_EXECUTE and len(send.data) == 32  # type: ignore[attr-defined]
    good = Request(10, 0, ndr.wrap_request(kms_payload(), False)).encode()
    only(conn.feed(good), Call)


@pytest.mark.parametrize(
    ("stub", "status"),
    [
        (b"\x01\x02", FaultStatus.BAD_STUB_DATA),  # shorter than its header
        (
            struct.pack("<II", 260, 259) + bytes(260),
            FaultStatus.BAD_STUB_DATA,
        ),  # size != conformance
        (struct.pack("<II", 4000, 4000) + bytes(10), FaultStatus.BAD_STUB_DATA),  # size > stub
    ],
)
def test_garbage_stub_gets_bad_stub_data_fault(stub: bytes, status: int) -> None:
    conn = bound()
    fault = parse_pdu(only(conn.feed(Request(3, 0, stub).encode()), Send).data)  # type: ignore[attr-defined]
    assert isinstance(fault, Fault) and fault.status == status and fault.call_id == 3


def test_wrong_opnum_gets_range_fault() -> None:
    conn = bound()
    req = Request(4, 0, ndr.wrap_request(kms_payload(), False), opnum=1).encode()
    fault = parse_pdu(only(conn.feed(req), Send).data)  # type: ignore[attr-defined]
    assert isinstance(fault, Fault) and fault.status == FaultStatus.OP_RNG_ERROR


def test_truncated_request_pdu_gets_proto_error_fault() -> None:
    conn = bound()
    data = bytearray(Request(4, 0, b"").encode()[:20])
    data[8:10] = struct.pack("<H", 20)
    fault = parse_pdu(only(conn.feed(bytes(data)), Send).data)  # type: ignore[attr-defined]
    assert isinstance(fault, Fault) and fault.status == FaultStatus.PROTO_ERROR


@pytest.mark.parametrize("length", [0, 15, 6000, 65535])
def test_frag_length_out_of_range_closes(length: int) -> None:
    data = bytearray(RpcClient().bind())
    data[8:10] = struct.pack("<H", length)
    events = new_conn().feed(bytes(data))
    assert len(events) == 1 and isinstance(events[0], Close)
    assert str(length) in events[0].reason


def test_pdu_split_across_reads_and_several_pdus_in_one_read() -> None:
    conn = new_conn()
    client = RpcClient(BindOptions(ndr64=False))
    stream = client.bind() + Request(2, 0, ndr.wrap_request(kms_payload(), False)).encode()
    events: list[Event] = []
    for i in range(0, len(stream), 7):
        events += conn.feed(stream[i : i + 7])
    assert [type(e) for e in events] == [Send, Call]
    # The same stream at once.
    assert [type(e) for e in new_conn().feed(stream)] == [Send, Call]


@pytest.mark.parametrize("ndr64", [False, True])
def test_fragmented_request_is_reassembled(ndr64: bool) -> None:
    conn = bound(ndr64)
    payload = kms_payload()
    stub = ndr.wrap_request(payload, ndr64)
    parts = [stub[i : i + 50] for i in range(0, len(stub), 50)]
    events: list[Event] = []
    for i, part in enumerate(parts):
        flags = (Flags.FIRST_FRAG if i == 0 else 0) | (
            Flags.LAST_FRAG if i == len(parts) - 1 else 0
        )
        events += conn.feed(Request(6, 0, part, flags=flags, alloc_hint=len(stub)).encode())
    call = only(events, Call)
    assert isinstance(call, Call) and call.payload == payload and call.call_id == 6


def test_fragmented_call_on_unbound_context_is_refused_at_its_first_fragment() -> None:
    conn = bound()
    first = Request(5, 3, bytes(100), flags=Flags.FIRST_FRAG).encode()
    fault = parse_pdu(only(conn.feed(first), Send).data)  # type: ignore[attr-defined]
    assert isinstance(fault, Fault) and fault.status == FaultStatus.UNK_IF
    assert conn.feed(Request(5, 3, bytes(100), flags=0).encode()) == []
    assert conn.feed(Request(5, 3, bytes(10), flags=Flags.LAST_FRAG).encode()) == []
    assert conn.pending_bytes() == 0


def test_stray_fragment_and_oversized_reassembly_get_faults() -> None:
    conn = bound()
    stray = Request(8, 0, b"abc", flags=Flags.LAST_FRAG).encode()
    fault = parse_pdu(only(conn.feed(stray), Send).data)  # type: ignore[attr-defined]
    assert isinstance(fault, Fault) and fault.status == FaultStatus.PROTO_ERROR
    conn = ServerConnection(port=1688, groups=AssociationGroups(1), max_call=1000)
    conn.feed(Bind(2, (ContextElement(0, KMS_INTERFACE, (NDR32,)),)).encode())
    events: list[Event] = []
    for i in range(5):
        flags = Flags.FIRST_FRAG if i == 0 else 0
        events += conn.feed(Request(9, 0, bytes(300), flags=flags).encode())
    fault = parse_pdu(only(events, Send).data)  # type: ignore[attr-defined]
    assert isinstance(fault, Fault) and fault.call_id == 9
    assert conn.pending_bytes() == 0  # the call was dropped; its later fragments are ignored
    events = conn.feed(Request(9, 0, bytes(10), flags=Flags.LAST_FRAG).encode())
    assert events == []
    only(conn.feed(Request(10, 0, ndr.wrap_request(b"k" * 260, False)).encode()), Call)


def test_fragment_sizes_are_negotiated_down_to_the_dce_minimum() -> None:
    conn = new_conn()
    bind = Bind(2, (ContextElement(0, KMS_INTERFACE, (NDR32,)),), max_recv_frag=100)
    (ack,) = sent(conn.feed(bind.encode()))
    assert isinstance(ack, BindAck)
    assert (ack.max_xmit_frag, ack.max_recv_frag) == (1432, 5840)
    conn = new_conn(max_pdu=2000)
    (ack,) = sent(conn.feed(RpcClient().bind()))
    assert (ack.max_xmit_frag, ack.max_recv_frag) == (2000, 2000)  # type: ignore[attr-defined]


def test_request_with_object_uuid() -> None:
    conn = bound()
    req = Request(3, 0, ndr.wrap_request(b"k" * 260, False), object_uuid=os.urandom(16))
    call = only(conn.feed(req.encode()), Call)
    assert isinstance(call, Call) and call.payload == b"k" * 260


def test_unexpected_pdu_type_closes_and_cancel_is_ignored() -> None:
    conn = bound()
    cancel = bytearray(Request(3, 0, b"").encode()[:16])
    cancel[2] = PType.CO_CANCEL
    cancel[8:10] = struct.pack("<H", 16)
    assert conn.feed(bytes(cancel)) == []
    events = conn.feed(Response(3, 0, b"").encode())
    assert len(events) == 1 and isinstance(events[0], Close)
    assert conn.feed(RpcClient().bind()) == []  # closed: nothing more is handled


def test_association_groups_are_joined_and_released() -> None:
    groups = AssociationGroups(0xFFFFFFFF)
    first = ServerConnection(port=1688, groups=groups)
    (ack1,) = sent(first.feed(RpcClient().bind()))
    second = ServerConnection(port=1688, groups=groups)
    join = Bind(2, (ContextElement(0, KMS_INTERFACE, (NDR32,)),), assoc_group=ack1.assoc_group)  # type: ignore[attr-defined]
    (ack2,) = sent(second.feed(join.encode()))
    third = ServerConnection(port=1688, groups=groups)
    (ack3,) = sent(third.feed(RpcClient().bind()))
    assert ack1.assoc_group == ack2.assoc_group == 0xFFFFFFFF  # type: ignore[attr-defined]
    assert ack3.assoc_group not in (0, 0xFFFFFFFF)  # type: ignore[attr-defined]
    for conn in (first, second, third):
        conn.close()
    assert len(groups) == 0


def test_refusals_say_what_they_send_and_metrics_count_them_from_that() -> None:
    """A Send that refuses input carries the fault or bind_nak it encodes, so the metrics
    label it without decoding bytes."""
    wrong_version = bytearray(RpcClient().bind())
    wrong_version[0] = 4
    inputs = [
        (bound(), Request(9, 5, ndr.wrap_request(kms_payload(), False)).encode()),
        (bound(), Request(4, 0, ndr.wrap_request(kms_payload(), False), opnum=1).encode()),
        (bound(), Request(3, 0, b"\x01\x02").encode()),
        (new_conn(), bytes(wrong_version)),
    ]
    metrics = Metrics()
    for conn, data in inputs:
        send = conn.feed(data)[0]
        assert isinstance(send, Send) and send.problem and send.refusal is not None
        assert parse_pdu(send.data) == send.refusal
        metrics.bad_input(send.refusal)
    (ack,) = new_conn().feed(RpcClient().bind())
    assert isinstance(ack, Send) and ack.refusal is None and ack.problem is None
    assert metrics.errors == {
        ("fault", "UNK_IF"): 1,
        ("fault", "OP_RNG_ERROR"): 1,
        ("fault", "BAD_STUB_DATA"): 1,
        ("bind_nak", "PROTOCOL_VERSION_NOT_SUPPORTED"): 1,
    }


@pytest.mark.parametrize(
    ("payload", "version", "label"),
    [(None, (6, 0), "6.0"), (b"\x00\x00\x07\x00", (7, 0), "other"), (b"\x00\x00", None, "unknown")],
)
def test_a_call_says_the_kms_version_it_claims(
    payload: bytes | None, version: tuple[int, int] | None, label: str
) -> None:
    message = kms_payload(6) if payload is None else payload
    call = only(bound().feed(Request(2, 0, ndr.wrap_request(message, False)).encode()), Call)
    assert isinstance(call, Call) and call.version == version
    metrics = Metrics()
    metrics.refusal(HResult.INVALID_DATA, call.version, "127.0.0.1", 0.0)
    assert list(metrics.activations) == [("unknown", "unknown", label, "refused-0x8007000D")]


def test_a_remembered_bind_is_answered_only_where_everything_it_was_answered_for_holds() -> None:
    """The memo finds a bind by its contexts; the answer is reused only when the rest of
    the bind (flags, fragment sizes) and the connection's port are those it was made for."""
    memo = BindAnswers()
    plain = RpcClient(BindOptions(multiplex=False)).bind()
    multiplexed = RpcClient(BindOptions(multiplex=True)).bind()
    assert plain[24:] == multiplexed[24:] and plain[:12] != multiplexed[:12]
    other_sizes = plain[:16] + struct.pack("<HH", 4280, 4280) + plain[20:]
    assert other_sizes != plain
    for port in (1688, 1688, 50000, 1688):
        for bind in (plain, multiplexed, other_sizes, plain):
            fresh = ServerConnection(port=port, groups=AssociationGroups(7)).feed(bind)
            remembered = ServerConnection(port=port, groups=AssociationGroups(7), answers=memo)
            assert remembered.feed(bind) == fresh
            assert isinstance(fresh[0], Send) and str(port).encode() in fresh[0].data
    assert len(memo) == 1  # one set of contexts: each bind took the place of the last
