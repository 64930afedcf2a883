"""Property-based tests: random and mutated input against the core and the running server.

Every property asserts a *defined* outcome for every input: the sans-IO connection never
raises and never writes more than twice what it was fed; mutated KMS messages are refused
exactly when the V4 MAC / V5-V6 CBC structure says they must be; codecs round-trip; and a
server fed garbage keeps serving good clients without an exception escaping.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import uuid
from typing import Any

import pytest
import structlog.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmsclient.session import KmsConnection
from kmsd.protocol import kms, ndr
from kmsd.protocol.client import BindOptions, RpcClient, base_request
from kmsd.protocol.connection import (
    AssociationGroups,
    BindAnswers,
    Call,
    Close,
    Send,
    ServerConnection,
)
from kmsd.protocol.crypto import E5, E6, xor16
from kmsd.protocol.errors import FaultStatus, HResult, KmsError
from kmsd.protocol.kms import (
    BASE_REQUEST_SIZE,
    V4_REQUEST_SIZE,
    V56_REQUEST_SIZE,
    BaseRequest,
    decode_request,
    decode_response,
    encode_request,
    guid_text,
)
from kmsd.protocol.products import products
from kmsd.protocol.rpc import (
    BTFN_FEATURES,
    HEADER_SIZE,
    KMS_INTERFACE,
    NDR32,
    NDR64,
    Bind,
    BindAck,
    BindNak,
    ContextElement,
    ContextResult,
    Fault,
    PType,
    Request,
    Response,
    Syntax,
    btfn_syntax,
    frag_length_of,
    parse_header,
    parse_pdu,
)
from kmsd.server import KmsServer
from tests.conftest import make_host, server_settings

PORT = 1688
SEED = 0x1234_5678
NOW = 1_700_000_000.0
SKU = next(s for s in products().skus.values() if s.kms.protocol == 6 and not s.kms.retail)
CMID = uuid.UUID("0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0ff")
IV = bytes(range(0x40, 0x50))
BIND_OPTIONS = [
    BindOptions(),
    BindOptions(ndr64=False),
    BindOptions(btfn=False, multiplex=False),
    BindOptions(ndr64=False, btfn=False),
]
HOST = make_host()

FAST = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
iv16 = st.binary(min_size=16, max_size=16)


def fresh_connection(**kwargs: Any) -> ServerConnection:
    return ServerConnection(port=PORT, groups=AssociationGroups(SEED), **kwargs)


def split_pdus(data: bytes) -> list[bytes]:
    """Cut a byte stream written by the server into its PDUs (all must be complete)."""
    out = []
    while data:
        assert len(data) >= HEADER_SIZE, f"trailing {len(data)} bytes are not a PDU"
        length = frag_length_of(data)
        assert HEADER_SIZE <= length <= len(data), f"bad frag_length {length}"
        out.append(data[:length])
        data = data[length:]
    return out


def kms_message(major: int, *, iv: bytes = IV, cmid: uuid.UUID = CMID) -> tuple[BaseRequest, bytes]:
    base = base_request(SKU, major=major, now=NOW, client_machine_id=cmid)
    return base, encode_request(base, iv=iv if major >= 5 else b"")


def bound_client(options: BindOptions) -> tuple[ServerConnection, RpcClient]:
    conn = fresh_connection()
    client = RpcClient(options)
    events = conn.feed(client.bind())
    assert len(events) == 1 and isinstance(events[0], Send) and events[0].problem is None
    client.on_bind_ack(events[0].data)
    return conn, client


# --------------------------------------------------------------------------- strategies


@st.composite
def syntaxes(draw: st.DrawFn) -> Syntax:
    return draw(
        st.one_of(
            st.sampled_from([NDR32, NDR64, KMS_INTERFACE, btfn_syntax(BTFN_FEATURES)]),
            st.builds(btfn_syntax, u64),
            st.builds(Syntax, st.binary(min_size=16, max_size=16), u32),
        )
    )


context_elements = st.builds(
    ContextElement,
    context_id=u16,
    abstract=syntaxes(),
    transfers=st.lists(syntaxes(), min_size=1, max_size=3).map(tuple),
)

binds = st.builds(
    Bind,
    call_id=u32,
    contexts=st.lists(context_elements, max_size=4).map(tuple),
    flags=u8,
    max_xmit_frag=u16,
    max_recv_frag=u16,
    assoc_group=u32,
    alter=st.booleans(),
)


def _valid_request_pdu(options: BindOptions, major: int) -> bytes:
    client = RpcClient(options)
    client.on_bind_ack(fresh_connection().feed(client.bind())[0].data)  # type: ignore[union-attr]
    return client.request(kms_message(major)[1])[0]


VALID_PIECES = [RpcClient(o).bind() for o in BIND_OPTIONS] + [
    _valid_request_pdu(o, m) for o in BIND_OPTIONS[:2] for m in (4, 5, 6)
]


@st.composite
def random_header_pdu(draw: st.DrawFn) -> bytes:
    """A 16-byte header with arbitrary fields (mostly plausible) and an arbitrary body."""
    body = draw(st.binary(max_size=120))
    ptype = draw(st.one_of(st.sampled_from(list(PType)), u8))
    version = draw(st.sampled_from([(5, 0), (5, 1), (4, 0)]) | st.tuples(u8, u8))
    flags = draw(st.sampled_from([0x03, 0x13, 0x01, 0x02, 0x00, 0x83]) | u8)
    drep = draw(st.sampled_from([0x10, 0x00, 0x11]) | u32)
    length = draw(st.sampled_from([HEADER_SIZE + len(body)]) | u16)
    auth = draw(st.sampled_from([0]) | u16)
    call_id = draw(u32)
    return struct.pack("<BBBBIHHI", *version, ptype, flags, drep, length, auth, call_id) + body


stream_pieces = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(VALID_PIECES),
    random_header_pdu(),
    binds.map(lambda b: b.encode()),
)
streams = st.lists(stream_pieces, max_size=6).map(b"".join)


@st.composite
def mutations(draw: st.DrawFn, min_ops: int = 1) -> list[tuple[str, int, Any]]:
    ops = []
    for _ in range(draw(st.integers(min_ops, 4))):
        kind = draw(st.sampled_from(["flip", "flip", "xor", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, 400))
        if kind == "flip":
            arg: Any = 1 << draw(st.integers(0, 7))
        elif kind == "xor":
            arg = draw(st.integers(1, 255))
        elif kind == "insert":
            arg = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            arg = draw(st.integers(1, 8))
        else:
            arg = None
        ops.append((kind, pos, arg))
    return ops


def mutate(data: bytes, ops: list[tuple[str, int, Any]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, arg in ops:
        if kind in ("flip", "xor"):
            if buf:
                buf[pos % len(buf)] ^= arg
        elif kind == "insert":
            at = pos % (len(buf) + 1)
            buf[at:at] = arg
        elif kind == "delete":
            if buf:
                at = pos % len(buf)
                del buf[at : at + arg]
        else:
            del buf[pos % (len(buf) + 1) :]
    return bytes(buf)


workstations = st.text(
    alphabet=st.characters(min_codepoint=1, exclude_categories=["Cs"]), max_size=63
).filter(lambda s: len(s.encode("utf-16-le")) <= 126)

guids = st.binary(min_size=16, max_size=16)  # as sent: any 16 bytes
base_requests = st.builds(
    BaseRequest,
    major=st.sampled_from([4, 5, 6]),
    minor=st.just(0),
    is_vm=u32,
    license_status=u32,
    binding_expiration=u32,
    application_id=guids,
    sku_id=guids,
    kms_id=guids,
    client_machine_id=guids,
    required_count=u32,
    request_time=u64,
    previous_client_machine_id=guids,
    workstation=workstations,
)


@FAST
@given(raw=guids)
def test_guid_text_is_the_uuid_text(raw: bytes) -> None:
    assert guid_text(raw) == str(uuid.UUID(bytes_le=raw))


# ------------------------------------------------------- 1. feed() with arbitrary bytes


def check_events(events: list[Any], fed: int) -> None:
    """The invariants of any event list produced by feeding `fed` bytes."""
    assert all(isinstance(e, Send | Close | Call) for e in events)
    closes = [i for i, e in enumerate(events) if isinstance(e, Close)]
    assert closes in ([], [len(events) - 1]), "a Close must be the last event"
    sent = sum(len(e.data) for e in events if isinstance(e, Send))
    # Per handled PDU of L >= 16 bytes the connection writes at most 2L: a fault (32) or
    # bind_nak (24) answers a PDU of >= 16 bytes; a bind_ack is 28 + addr(<= 6) + pad +
    # 24 n <= L + 8 for a bind of L >= 28 + 44 n. So nothing can amplify beyond 2x.
    assert sent <= 2 * fed
    for e in events:
        if isinstance(e, Send):
            for pdu in split_pdus(e.data):
                assert isinstance(parse_pdu(pdu), Fault | BindNak | BindAck)
        elif isinstance(e, Call):
            assert len(e.payload) <= fed  # a call carries received bytes, nothing invented


connection_configs = st.fixed_dictionaries(
    {"ndr64": st.booleans(), "btfn": st.booleans(), "max_pdu": st.sampled_from([5840, 300, 64])}
)


@FAST
@given(stream=streams, cuts=st.lists(st.integers(0, 2000), max_size=8), config=connection_configs)
def test_feed_never_raises_and_is_chunking_invariant(
    stream: bytes, cuts: list[int], config: dict[str, Any]
) -> None:
    whole = fresh_connection(**config)
    expected = whole.feed(stream)
    check_events(expected, len(stream))
    if whole.closed:
        assert whole.feed(stream) == []
        assert whole.feed(b"\x05\x00\x0b") == []

    points = sorted({c % (len(stream) + 1) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    chunked = fresh_connection(**config)
    got: list[Any] = []
    for piece in pieces:
        got.extend(chunked.feed(piece))
    assert got == expected
    assert chunked.closed == whole.closed
    if not whole.closed:  # after a Close the rest of the input is ignored, not buffered
        assert chunked.pending_bytes() == whole.pending_bytes()


@FAST
@given(data=st.binary(max_size=600), byte_by_byte=st.booleans())
def test_feed_random_bytes(data: bytes, byte_by_byte: bool) -> None:
    conn = fresh_connection()
    events: list[Any] = []
    if byte_by_byte:
        for i in range(len(data)):
            events.extend(conn.feed(data[i : i + 1]))
    else:
        events = conn.feed(data)
    check_events(events, len(data))
    if conn.closed:
        assert conn.feed(data) == []


# ------------------------------------------------------------- 2. mutations of valid PDUs


def outcome_of_call(call: Call) -> None:
    """host.answer gives bytes or KmsError; either way the reply is a valid response."""
    try:
        payload, _ = HOST.answer(call.payload, NOW)
    except KmsError as exc:
        reply, expected = call.reply_error(exc.hresult), b""
    else:
        reply, expected = call.reply(payload), payload
    pdus = [parse_pdu(p) for p in split_pdus(reply)]
    assert all(isinstance(p, Response) and p.call_id == call.call_id for p in pdus)
    stub = b"".join(p.stub for p in pdus if isinstance(p, Response))
    assert ndr.unwrap_response(stub, call.ndr64)[0] == expected


@SLOW
@given(
    options=st.sampled_from(BIND_OPTIONS),
    major=st.sampled_from([4, 5, 6]),
    ops=mutations(),
)
def test_mutated_request_pdu(options: BindOptions, major: int, ops: list[Any]) -> None:
    conn, client = bound_client(options)
    pdu = client.request(kms_message(major)[1])[0]
    mutated = mutate(pdu, ops)
    events = conn.feed(mutated)
    check_events(events, len(mutated))
    for e in events:
        if isinstance(e, Call):
            outcome_of_call(e)
        elif isinstance(e, Send):
            first = parse_pdu(split_pdus(e.data)[0])
            if isinstance(first, Fault):
                assert first.status in set(FaultStatus)


@FAST
@given(
    options=st.sampled_from(BIND_OPTIONS),
    major=st.sampled_from([4, 5, 6]),
    changes=st.lists(st.tuples(st.integers(0, 23), st.integers(1, 255)), max_size=3),
    cut=st.integers(0, 8),
)
def test_whole_request_shortcut_answers_as_the_general_path(
    options: BindOptions, major: int, changes: list[tuple[int, int]], cut: int
) -> None:
    """The usual request (one fragment, bound context, opnum 0) is read without parse_pdu;
    for any header it takes, its event is the one the general path makes."""
    conn, client = bound_client(options)
    buf = bytearray(client.request(kms_message(major)[1])[0])
    for at, xor in changes:
        buf[at] ^= xor
    pdu = bytes(buf[: len(buf) - cut])
    if frag_length_of(pdu) != len(pdu) or pdu[2] != PType.REQUEST:  # what feed() asks it
        return
    shortcut = conn._whole_request(pdu)
    if shortcut is None:
        return
    header = parse_header(pdu)
    assert header.version == (5, 0) and header.auth_length == 0
    general = parse_pdu(pdu, header)
    assert isinstance(general, Request)
    assert [shortcut] == conn._request(general)


@SLOW
@given(options=st.sampled_from(BIND_OPTIONS), ops=mutations())
def test_mutated_bind(options: BindOptions, ops: list[Any]) -> None:
    """A mutated bind ends as a bind_ack, a bind_nak, a fault, a Close, or waits for more."""
    conn = fresh_connection()
    bind = mutate(RpcClient(options).bind(), ops)
    events = conn.feed(bind)
    check_events(events, len(bind))
    # Then a good request on the same connection: either answered or the conn is closed.
    if not conn.closed and not conn.pending_bytes():
        for e in conn.feed(_valid_request_pdu(options, 6)):
            assert isinstance(e, Send | Call | Close)


def _conversation(conn: ServerConnection, pdus: list[bytes]) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for pdu in pdus:
        for e in conn.feed(pdu):
            if isinstance(e, Send):
                out.append(("send", e.data))
            elif isinstance(e, Call):
                out.append(("call", bytes([e.context_id, e.ndr64]) + e.payload))
            else:
                out.append(("close", b""))
    return out


@SLOW
@given(
    sessions=st.lists(
        st.lists(
            st.one_of(
                binds.map(lambda b: b.encode()),
                st.sampled_from([RpcClient(o).bind() for o in BIND_OPTIONS]),
                st.builds(
                    lambda o, c: RpcClient(o, first_call_id=c).bind(),
                    st.sampled_from(BIND_OPTIONS),
                    u32,
                ),
            ),
            min_size=1,
            max_size=3,
        ),
        min_size=1,
        max_size=6,
    ),
    major=st.sampled_from([4, 5, 6]),
)
def test_remembered_bind_answers_are_the_negotiated_ones(
    sessions: list[list[bytes]], major: int
) -> None:
    """Connections sharing a BindAnswers memo answer exactly as connections negotiating
    every bind afresh (same association groups, contexts and bytes), then a request."""
    request = _valid_request_pdu(BIND_OPTIONS[0], major)
    memo = BindAnswers(size=4)  # small, so that it also fills up and starts afresh
    groups_memo, groups_fresh = AssociationGroups(SEED), AssociationGroups(SEED)
    for pdus in sessions + sessions:  # the second round finds every bind remembered
        remembered = ServerConnection(port=PORT, groups=groups_memo, answers=memo)
        fresh = ServerConnection(port=PORT, groups=groups_fresh)
        assert _conversation(remembered, [*pdus, request]) == _conversation(fresh, [*pdus, request])
        remembered.close()
        fresh.close()


# For the KMS layer: a model of which mutations decode_request(verify=True) must refuse.
# Field byte ranges of the 236-byte base request (docs/protocol.md, The base request).
BASE_FIELDS = [
    ("minor", 0, 2),
    ("major", 2, 4),
    ("is_vm", 4, 8),
    ("license_status", 8, 12),
    ("binding_expiration", 12, 16),
    ("application_id", 16, 32),
    ("sku_id", 32, 48),
    ("kms_id", 48, 64),
    ("client_machine_id", 64, 80),
    ("required_count", 80, 84),
    ("request_time", 84, 92),
    ("previous_client_machine_id", 92, 108),
    ("workstation", 108, 236),
]


def predict_v56(original: bytes, mutated: bytes, major: int) -> dict[int, bytes] | None:
    """None if the mutated V5/V6 request must be refused; otherwise the plaintext blocks
    (index 0..14) whose content CBC determines without knowing the block cipher.

    CBC: P_i = D(C_i) xor C_(i-1), C_0 = IV. Changing C_(i-1) alone xors P_i by the same
    delta; changing C_i garbles P_i (a random block). The padding lives in P_15[12:16] and
    the inner version in P_1[0:4]. A garbled block passes a 4-byte check only with
    probability 2^-32, which we treat as never; a version word change is always refused.
    """
    if len(mutated) < V56_REQUEST_SIZE:
        return None
    m = mutated[:V56_REQUEST_SIZE]
    if m[:4] != original[:4]:
        return None
    cipher = E6 if major == 6 else E5
    plain = cipher.cbc_decrypt(original[4:20], original[20:V56_REQUEST_SIZE])
    c_orig = [original[4 + 16 * i : 20 + 16 * i] for i in range(16)]
    c_mut = [m[4 + 16 * i : 20 + 16 * i] for i in range(16)]
    known = {}
    for i in range(1, 16):
        if c_mut[i] == c_orig[i]:
            known[i - 1] = xor16(plain[16 * (i - 1) : 16 * i], xor16(c_orig[i - 1], c_mut[i - 1]))
    if 14 not in known or known[14][12:] != b"\x04" * 4:
        return None
    if 0 not in known or known[0][:4] != plain[:4]:
        return None
    return known


def check_decode_against_model(major: int, original: bytes, mutated: bytes) -> None:
    if major == 4:
        intact = len(mutated) >= V4_REQUEST_SIZE and mutated[:V4_REQUEST_SIZE] == original
        if not intact:
            # Any change to the 252 bytes: the version word, or else the CBC-MAC.
            with pytest.raises(KmsError) as info:
                decode_request(mutated)
            assert info.value.hresult == HResult.INVALID_DATA
        else:  # only bytes after the 252 were added: ignored
            assert decode_request(mutated) == decode_request(original)
        return
    known = predict_v56(original, mutated, major)
    if known is None:
        with pytest.raises(KmsError) as info:
            decode_request(mutated)
        assert info.value.hresult == HResult.INVALID_DATA
        return
    got = decode_request(mutated)
    cipher = E6 if major == 6 else E5
    assert (got.major, got.minor) == (major, 0)
    assert got.iv == mutated[4:20]
    assert got.dc == cipher.decrypt_block(mutated[4:20])
    predicted = BaseRequest.decode(b"".join(known.get(i, bytes(16)) for i in range(15)))
    for name, start, end in BASE_FIELDS:
        if all(i in known for i in range(start // 16, (end - 1) // 16 + 1)):
            assert getattr(got.base, name) == getattr(predicted, name), name


@FAST
@given(major=st.sampled_from([4, 5, 6]), iv=iv16, ops=mutations())
def test_mutated_kms_message_decode(major: int, iv: bytes, ops: list[Any]) -> None:
    original = kms_message(major, iv=iv)[1]
    check_decode_against_model(major, original, mutate(original, ops))


@FAST
@given(
    major=st.sampled_from([5, 6]),
    block=st.integers(0, 15),
    offset=st.integers(0, 15),
    delta=st.integers(1, 255),
)
def test_single_byte_change_v56(major: int, block: int, offset: int, delta: int) -> None:
    """Every single-byte change of the IV or ciphertext, spelled out by position."""
    original = kms_message(major)[1]
    pos = 4 + 16 * block + offset
    mutated = bytearray(original)
    mutated[pos] ^= delta
    known = predict_v56(original, bytes(mutated), major)
    # The model's verdict by position: IV bytes 0-3 (inner version), the first ciphertext
    # block (garbles the version), C14 bytes 12-15 (padding), the last block (garbles it).
    refused = (
        (block == 0 and offset < 4) or block == 1 or (block == 14 and offset >= 12) or block == 15
    )
    assert (known is None) == refused
    check_decode_against_model(major, original, bytes(mutated))


@SLOW
@given(
    options=st.sampled_from(BIND_OPTIONS),
    major=st.sampled_from([4, 5, 6]),
    iv=iv16,
    ops=mutations(),
)
def test_mutated_kms_payload_through_connection(
    options: BindOptions, major: int, iv: bytes, ops: list[Any]
) -> None:
    """A well-framed call with a mutated KMS message: the host refuses it with
    INVALID_DATA exactly when the model says so; an accepted one gets a reply that a
    client holding the decoded request verifies."""
    conn, client = bound_client(options)
    original = kms_message(major, iv=iv)[1]
    mutated = mutate(original, ops)
    events = conn.feed(client.request(mutated)[0])
    assert len(events) == 1 and isinstance(events[0], Call)
    call = events[0]
    assert call.payload == mutated
    check_decode_against_model(major, original, mutated)
    try:
        decoded = decode_request(mutated)
    except KmsError:
        with pytest.raises(KmsError) as info:
            HOST.answer(mutated, NOW)
        assert info.value.hresult == HResult.INVALID_DATA
    else:
        try:
            payload, activation = HOST.answer(mutated, NOW)
        except KmsError as exc:
            # A garbled base may carry an N-count policy the host refuses.
            assert decoded.base.required_count > 1000
            assert exc.hresult == HResult.INVALID_DATA
        else:
            assert activation.request == decoded.base
            decode_response(decoded.base, decoded.iv, payload)
    outcome_of_call(call)


# ------------------------------------------------------------------------ 3. round trips


@FAST
@given(base=base_requests)
def test_base_request_round_trip(base: BaseRequest) -> None:
    raw = base.encode()
    assert len(raw) == BASE_REQUEST_SIZE
    assert BaseRequest.decode(raw) == base


@FAST
@given(base=base_requests, iv=iv16)
def test_kms_request_round_trip(base: BaseRequest, iv: bytes) -> None:
    message = encode_request(base, iv=iv if base.major >= 5 else b"")
    assert len(message) == (V4_REQUEST_SIZE if base.major == 4 else V56_REQUEST_SIZE)
    got = decode_request(message)
    assert got.base == base and (got.major, got.minor) == (base.major, 0)
    if base.major >= 5:
        cipher = E6 if base.major == 6 else E5
        assert got.iv == iv and got.dc == cipher.decrypt_block(iv)


@SLOW
@given(base=base_requests.filter(lambda b: b.required_count <= 1000), iv=iv16, data=st.data())
def test_host_answer_verifies(base: BaseRequest, iv: bytes, data: st.DataObject) -> None:
    if data.draw(st.booleans()):  # also known products, not only random GUIDs
        sku = data.draw(st.sampled_from(sorted(products().skus.values(), key=lambda s: s.name)))
        base = base_request(
            sku,
            major=base.major,
            client_machine_id=uuid.UUID(bytes_le=base.client_machine_id),
            now=NOW,
            workstation=base.workstation,
        )
    iv = iv if base.major >= 5 else b""
    payload, activation = HOST.answer(encode_request(base, iv=iv), NOW)
    response = decode_response(base, iv, payload)
    assert response.base.count == activation.count >= 1
    assert response.base.epid == activation.epid


def _results() -> st.SearchStrategy[ContextResult]:
    return st.builds(ContextResult, result=u16, reason=u16, syntax=syntaxes())


PDUS: dict[str, st.SearchStrategy[Any]] = {
    "bind": binds,
    "bind_ack": st.builds(
        BindAck,
        call_id=u32,
        results=st.lists(_results(), max_size=4).map(tuple),
        sec_addr=st.binary(max_size=12).filter(lambda a: not a.endswith(b"\x00")),
        flags=u8,
        max_xmit_frag=u16,
        max_recv_frag=u16,
        assoc_group=u32,
        alter=st.booleans(),
    ),
    "bind_nak": st.builds(
        BindNak, call_id=u32, reason=u16, versions=st.lists(st.tuples(u8, u8)).map(tuple)
    ),
    "request": st.builds(
        Request,
        call_id=u32,
        context_id=u16,
        stub=st.binary(max_size=300),
        opnum=u16,
        flags=u8.map(lambda f: f & 0x7F),
        alloc_hint=st.none() | u32,
        object_uuid=st.none() | st.binary(min_size=16, max_size=16),
    ),
    "response": st.builds(
        Response,
        call_id=u32,
        context_id=u16,
        stub=st.binary(max_size=300),
        flags=u8,
        alloc_hint=st.none() | u32,
        cancel_count=u8,
    ),
    "fault": st.builds(
        Fault,
        call_id=u32,
        context_id=u16,
        status=u32,
        flags=u8,
        alloc_hint=u32,
        cancel_count=u8,
    ),
}


def _normalised(pdu: Any) -> Any:
    """What parse_pdu gives back for an encoded PDU: defaults made explicit."""
    if isinstance(pdu, Request):
        return Request(
            pdu.call_id,
            pdu.context_id,
            pdu.stub,
            pdu.opnum,
            pdu.flags | (0x80 if pdu.object_uuid else 0),
            len(pdu.stub) if pdu.alloc_hint is None else pdu.alloc_hint,
            pdu.object_uuid,
        )
    if isinstance(pdu, Response):
        hint = len(pdu.stub) if pdu.alloc_hint is None else pdu.alloc_hint
        return Response(pdu.call_id, pdu.context_id, pdu.stub, pdu.flags, hint, pdu.cancel_count)
    return pdu


@FAST
@given(data=st.data(), kind=st.sampled_from(sorted(PDUS)))
def test_rpc_pdu_round_trip(data: st.DataObject, kind: str) -> None:
    pdu = data.draw(PDUS[kind])
    encoded = pdu.encode()
    assert frag_length_of(encoded) == len(encoded)
    assert parse_pdu(encoded) == _normalised(pdu)


# ------------------------------------------------------------ 4. the running server


async def _garbage_then_good_client(garbage: list[bytes], major: int) -> list[dict[str, Any]]:
    """Send garbage on one connection; while it is open a good client must activate.
    Returns what the loop's exception handler caught."""
    loop = asyncio.get_running_loop()
    caught: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: caught.append(context))
    srv = KmsServer(make_host(), server_settings())
    await srv.start()
    try:
        host, port = srv.addresses[0]
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        with contextlib.suppress(ConnectionError):
            for piece in garbage:
                writer.write(piece)
                await asyncio.wait_for(writer.drain(), 5)

        good = await asyncio.wait_for(KmsConnection.open(host, port), 5)
        try:
            base = base_request(SKU, major=major)
            response = await asyncio.wait_for(good.activate(base), 5)
            assert response.base.client_machine_id == base.client_machine_id
        finally:
            await asyncio.wait_for(good.close(), 5)

        # End the garbage connection from our side; the server must close it in turn.
        with contextlib.suppress(OSError):
            writer.write_eof()
        replies = b""
        reset = False
        try:
            while chunk := await asyncio.wait_for(reader.read(65536), 5):
                replies += chunk
        except ConnectionError:  # reset, or our own earlier write hit the closed socket
            reset = True
        writer.close()
        with contextlib.suppress(OSError):
            await asyncio.wait_for(writer.wait_closed(), 5)
        if not reset:  # everything the server wrote is whole PDUs of the expected types
            for pdu in split_pdus(replies):
                assert isinstance(parse_pdu(pdu), BindAck | BindNak | Fault | Response)
    finally:
        await asyncio.wait_for(srv.stop(), 5)
    return caught


server_garbage = st.lists(
    st.one_of(
        st.binary(min_size=1, max_size=200),
        random_header_pdu(),
        st.tuples(st.sampled_from(VALID_PIECES), mutations()).map(lambda t: mutate(*t)),
        st.sampled_from(VALID_PIECES),
    ),
    min_size=1,
    max_size=5,
)


@pytest.mark.system
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=server_garbage, major=st.sampled_from([4, 5, 6]))
def test_server_survives_garbage(garbage: list[bytes], major: int) -> None:
    with structlog.testing.capture_logs() as logs:
        caught = asyncio.run(_garbage_then_good_client(garbage, major))
    assert caught == [], caught
    bad = [e for e in logs if e.get("log_level") in ("error", "critical") or "exc_info" in e]
    assert bad == [], bad


def _utf16z_by_code_units(raw: bytes) -> str:
    """The workstation field read code unit by code unit, up to the first NUL unit."""
    units = [raw[i : i + 2] for i in range(0, len(raw) - 1, 2)]
    end = units.index(b"\x00\x00") if b"\x00\x00" in units else len(units)
    return b"".join(units[:end]).decode("utf-16-le", errors="replace")


@settings(max_examples=500, derandomize=True, deadline=None)
@given(
    raw=st.one_of(
        st.binary(min_size=128, max_size=128),
        st.builds(
            lambda text, tail: (text.encode("utf-16-le", "surrogatepass") + b"\x00\x00" + tail)[
                :128
            ].ljust(128, b"\x00"),
            st.text(max_size=70),
            st.binary(max_size=128),
        ),
    )
)
def test_workstation_decodes_up_to_the_first_nul_code_unit(raw: bytes) -> None:
    assert kms._utf16z_decode(raw) == _utf16z_by_code_units(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"a\x00\x00b\x00" + bytes(123),  # "a" then NUL: the odd NUL pair is not a unit
        "pc\U0001f600".encode("utf-16-le") + b"\x00\x00" + b"\xff" * 118,
        b"\x00\xd8\x00\x00" + b"\x41\x00" * 62,  # a lone high surrogate before the NUL
        b"\x41\x00" * 64,  # no NUL at all
    ],
)
def test_workstation_fixed_cases(raw: bytes) -> None:
    assert kms._utf16z_decode(raw) == _utf16z_by_code_units(raw)
