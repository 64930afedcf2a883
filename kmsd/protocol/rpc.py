"""DCE-RPC connection-oriented PDUs used by KMS (docs/protocol.md, DCE-RPC), encode and decode.

Every PDU is a frozen dataclass with `encode()`; `parse_pdu()` turns one complete PDU
(framed by its frag_length) back into one. Only little-endian, unauthenticated PDUs are
decoded in full; the header alone is enough to refuse anything else properly.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Final
from uuid import UUID

HEADER = struct.Struct("<BBBBIHHI")  # vers, minor, PTYPE, flags, drep, frag_len, auth_len, call_id
HEADER_SIZE = HEADER.size
# The header and what follows it in a request and a response: one unpack or pack per call.
REQUEST_HEAD = struct.Struct(HEADER.format + "IHH")  # alloc_hint, p_cont_id, opnum
RESPONSE_HEAD = struct.Struct(HEADER.format + "IHBx")  # alloc_hint, p_cont_id, cancel_count
DREP_LE = 0x00000010  # little-endian integers, ASCII, IEEE floats
RPC_VERSION = (5, 0)
MAX_FRAG = 5840  # the fragment size Windows offers in its binds (and kmsd's default limit)
MUST_RECV_FRAG = 1432  # DCE-RPC: every peer accepts fragments at least this large


class PType(IntEnum):
    REQUEST = 0
    RESPONSE = 2
    FAULT = 3
    BIND = 11
    BIND_ACK = 12
    BIND_NAK = 13
    ALTER_CONTEXT = 14
    ALTER_CONTEXT_RESP = 15
    AUTH3 = 16
    SHUTDOWN = 17
    CO_CANCEL = 18
    ORPHANED = 19


class Flags:
    """pfc_flags bits (plain ints: flag arithmetic is on the per-request path; Final: mypyc
    compiles class constants only when they are declared so)."""

    FIRST_FRAG: Final = 0x01
    LAST_FRAG: Final = 0x02
    PENDING_CANCEL: Final = 0x04
    CONC_MPX: Final = 0x10
    DID_NOT_EXECUTE: Final = 0x20
    MAYBE: Final = 0x40
    OBJECT_UUID: Final = 0x80


WHOLE = Flags.FIRST_FRAG | Flags.LAST_FRAG


class Result(IntEnum):
    ACCEPTANCE = 0
    USER_REJECTION = 1
    PROVIDER_REJECTION = 2
    NEGOTIATE_ACK = 3


class Reason(IntEnum):
    NOT_SPECIFIED = 0
    ABSTRACT_SYNTAX_NOT_SUPPORTED = 1
    TRANSFER_SYNTAXES_NOT_SUPPORTED = 2


class NakReason(IntEnum):
    NOT_SPECIFIED = 0
    TEMPORARY_CONGESTION = 1
    LOCAL_LIMIT_EXCEEDED = 2
    PROTOCOL_VERSION_NOT_SUPPORTED = 4
    AUTHENTICATION_TYPE_NOT_RECOGNIZED = 8


@dataclass(frozen=True, slots=True)
class Syntax:
    """An interface or transfer syntax: 16 GUID bytes in wire order and a 32-bit version
    (for an interface, major in the low 16 bits and minor in the high 16 bits)."""

    uuid: bytes
    version: int

    @classmethod
    def of(cls, guid: str, version: int) -> Syntax:
        return cls(UUID(guid).bytes_le, version)

    def encode(self) -> bytes:
        return self.uuid + struct.pack("<I", self.version)


NIL_SYNTAX = Syntax(bytes(16), 0)
KMS_INTERFACE = Syntax.of("51c82175-844e-4750-b0d8-ec255555bc06", 1)
NDR32 = Syntax.of("8a885d04-1ceb-11c9-9fe8-08002b104860", 2)
NDR64 = Syntax.of("71710533-beba-4937-8319-b5dbef9ccc36", 1)
BTFN_PREFIX = UUID("6cb71c2c-9812-4540-0000-000000000000").bytes_le[:8]


class Btfn:
    """Bind-time feature negotiation bits (plain ints, like Flags)."""

    SECURITY_CONTEXT_MULTIPLEXING: Final = 0x0001
    KEEP_CONNECTION_ON_ORPHAN: Final = 0x0002


# What Windows and vlmcs offer, and all kmsd acknowledges.
BTFN_FEATURES = Btfn.SECURITY_CONTEXT_MULTIPLEXING | Btfn.KEEP_CONNECTION_ON_ORPHAN


def btfn_syntax(features: int) -> Syntax:
    return Syntax(BTFN_PREFIX + features.to_bytes(8, "little"), 1)


def btfn_features(syntax: Syntax) -> int | None:
    """The feature bitmask a BTFN transfer syntax offers, or None if it is not BTFN."""
    if syntax.uuid[:8] != BTFN_PREFIX:
        return None
    return int.from_bytes(syntax.uuid[8:], "little")


class PduError(Exception):
    """A PDU whose body does not fit its type or its frag_length."""


@dataclass(slots=True)  # made per request; not frozen, whose __init__ costs 3x
class Header:
    version: tuple[int, int]
    ptype: int
    flags: int
    drep: int
    frag_length: int
    auth_length: int
    call_id: int


def parse_header(data: bytes | bytearray) -> Header:
    vers, minor, ptype, flags, drep, frag_length, auth_length, call_id = HEADER.unpack_from(data)
    return Header((vers, minor), ptype, flags, drep, frag_length, auth_length, call_id)


def frag_length_of(data: bytes | bytearray) -> int:
    """frag_length of the PDU starting at data[0:16], read in the PDU's own byte order."""
    if data[4] & 0xF0 == 0x10:
        return int.from_bytes(data[8:10], "little")
    return int.from_bytes(data[8:10], "big")


def _header(ptype: PType, flags: int, length: int, call_id: int) -> bytes:
    return HEADER.pack(*RPC_VERSION, ptype, flags, DREP_LE, length, 0, call_id)


@dataclass(frozen=True, slots=True)
class ContextElement:
    context_id: int
    abstract: Syntax
    transfers: tuple[Syntax, ...]

    def encode(self) -> bytes:
        return (
            struct.pack("<HBx", self.context_id, len(self.transfers))
            + self.abstract.encode()
            + b"".join(t.encode() for t in self.transfers)
        )


@dataclass(frozen=True, slots=True)
class Bind:
    """bind (11) or alter_context (14)."""

    call_id: int
    contexts: tuple[ContextElement, ...]
    flags: int = WHOLE | Flags.CONC_MPX
    max_xmit_frag: int = MAX_FRAG
    max_recv_frag: int = MAX_FRAG
    assoc_group: int = 0
    alter: bool = False

    def encode(self) -> bytes:
        body = struct.pack(
            "<HHIB3x",
            self.max_xmit_frag,
            self.max_recv_frag,
            self.assoc_group,
            len(self.contexts),
        ) + b"".join(c.encode() for c in self.contexts)
        ptype = PType.ALTER_CONTEXT if self.alter else PType.BIND
        return _header(ptype, self.flags, HEADER_SIZE + len(body), self.call_id) + body


@dataclass(frozen=True, slots=True)
class ContextResult:
    result: int
    reason: int
    syntax: Syntax = NIL_SYNTAX

    def encode(self) -> bytes:
        return struct.pack("<HH", self.result, self.reason) + self.syntax.encode()


@dataclass(frozen=True, slots=True)
class BindAck:
    """bind_ack (12) or alter_context_resp (15)."""

    call_id: int
    results: tuple[ContextResult, ...]
    sec_addr: bytes  # without the NUL; empty in alter_context_resp
    flags: int = WHOLE
    max_xmit_frag: int = MAX_FRAG
    max_recv_frag: int = MAX_FRAG
    assoc_group: int = 0
    alter: bool = False

    def encode(self) -> bytes:
        addr = self.sec_addr + b"\x00" if self.sec_addr else b""
        body = (
            struct.pack(
                "<HHIH", self.max_xmit_frag, self.max_recv_frag, self.assoc_group, len(addr)
            )
            + addr
        )
        body += b"\x00" * (-(HEADER_SIZE + len(body)) % 4)
        body += struct.pack("<B3x", len(self.results))
        body += b"".join(r.encode() for r in self.results)
        ptype = PType.ALTER_CONTEXT_RESP if self.alter else PType.BIND_ACK
        return _header(ptype, self.flags, HEADER_SIZE + len(body), self.call_id) + body


@dataclass(frozen=True, slots=True)
class BindNak:
    call_id: int
    reason: int
    versions: tuple[tuple[int, int], ...] = (RPC_VERSION,)

    def encode(self) -> bytes:
        body = struct.pack("<HB", self.reason, len(self.versions))
        body += b"".join(struct.pack("<BB", *v) for v in self.versions)
        body += b"\x00" * (-len(body) % 4)
        return _header(PType.BIND_NAK, WHOLE, HEADER_SIZE + len(body), self.call_id) + body


@dataclass(slots=True)  # made per request; not frozen, whose __init__ costs 3x
class Request:
    call_id: int
    context_id: int
    stub: bytes
    opnum: int = 0
    flags: int = WHOLE
    alloc_hint: int | None = None  # None: the stub length
    object_uuid: bytes | None = None

    def encode(self) -> bytes:
        hint = len(self.stub) if self.alloc_hint is None else self.alloc_hint
        flags = self.flags | (Flags.OBJECT_UUID if self.object_uuid else 0)
        body = struct.pack("<IHH", hint, self.context_id, self.opnum)
        body += (self.object_uuid or b"") + self.stub
        return _header(PType.REQUEST, flags, HEADER_SIZE + len(body), self.call_id) + body


@dataclass(slots=True)  # made per request; not frozen, whose __init__ costs 3x
class Response:
    call_id: int
    context_id: int
    stub: bytes
    flags: int = WHOLE
    alloc_hint: int | None = None  # None: the stub length
    cancel_count: int = 0

    def encode(self) -> bytes:
        hint = len(self.stub) if self.alloc_hint is None else self.alloc_hint
        return response_pdu(
            self.call_id, self.context_id, self.stub, self.flags, hint, self.cancel_count
        )


_MAJOR, _MINOR = RPC_VERSION
_RESPONSE = int(PType.RESPONSE)  # a plain int: an enum member costs a class lookup
_RESPONSE_SIZE = RESPONSE_HEAD.size


def response_pdu(
    call_id: int,
    context_id: int,
    stub: bytes,
    flags: int = WHOLE,
    alloc_hint: int = -1,
    cancel_count: int = 0,
) -> bytes:
    """The bytes of a response PDU, the one layout of Response.encode; called without the
    object for every reply (`alloc_hint` -1: the stub's length)."""
    n = len(stub)
    return (
        RESPONSE_HEAD.pack(
            _MAJOR,
            _MINOR,
            _RESPONSE,
            flags,
            DREP_LE,
            _RESPONSE_SIZE + n,
            0,
            call_id,
            n if alloc_hint < 0 else alloc_hint,
            context_id,
            cancel_count,
        )
        + stub
    )


@dataclass(frozen=True, slots=True)
class Fault:
    call_id: int
    context_id: int
    status: int
    flags: int = WHOLE | Flags.DID_NOT_EXECUTE
    alloc_hint: int = 32
    cancel_count: int = 0

    def encode(self) -> bytes:
        body = struct.pack(
            "<IHBxI4x", self.alloc_hint, self.context_id, self.cancel_count, self.status
        )
        return _header(PType.FAULT, self.flags, HEADER_SIZE + len(body), self.call_id) + body


@dataclass(frozen=True, slots=True)
class OtherPdu:
    """A PDU type KMS has no use for (auth3, shutdown, co_cancel, orphaned, ...)."""

    header: Header
    body: bytes


Pdu = Bind | BindAck | BindNak | Request | Response | Fault | OtherPdu


def _need(data: bytes, size: int, what: str) -> None:
    if len(data) < size:
        raise PduError(f"{what}: PDU of {len(data)} bytes, at least {size} needed")


def _parse_syntax(data: bytes, offset: int) -> Syntax:
    return Syntax(data[offset : offset + 16], struct.unpack_from("<I", data, offset + 16)[0])


def _parse_bind(h: Header, data: bytes) -> Bind:
    name = "alter_context" if h.ptype == PType.ALTER_CONTEXT else "bind"
    _need(data, 28, name)
    max_xmit, max_recv, group, count = struct.unpack_from("<HHIB", data, 16)
    offset = 28
    contexts: list[ContextElement] = []
    for _ in range(count):
        _need(data, offset + 24, f"{name} context element {len(contexts)}")
        ctx_id, n_syntaxes = struct.unpack_from("<HB", data, offset)
        end = offset + 24 + 20 * n_syntaxes
        _need(data, end, f"{name} context element {ctx_id}")
        if n_syntaxes == 0:
            raise PduError(f"{name} context element {ctx_id} offers no transfer syntax")
        transfers = tuple(_parse_syntax(data, offset + 24 + 20 * i) for i in range(n_syntaxes))
        contexts.append(ContextElement(ctx_id, _parse_syntax(data, offset + 4), transfers))
        offset = end
    return Bind(
        h.call_id,
        tuple(contexts),
        h.flags,
        max_xmit,
        max_recv,
        group,
        h.ptype == PType.ALTER_CONTEXT,
    )


def _parse_bind_ack(h: Header, data: bytes) -> BindAck:
    _need(data, 26, "bind_ack")
    max_xmit, max_recv, group, addr_len = struct.unpack_from("<HHIH", data, 16)
    results_at = 26 + addr_len + (-(26 + addr_len) % 4)
    _need(data, results_at + 4, "bind_ack")
    addr = data[26 : 26 + addr_len].rstrip(b"\x00")
    count = data[results_at]
    _need(data, results_at + 4 + 24 * count, "bind_ack results")
    results = []
    for i in range(count):
        result, reason = struct.unpack_from("<HH", data, results_at + 4 + 24 * i)
        results.append(ContextResult(result, reason, _parse_syntax(data, results_at + 8 + 24 * i)))
    return BindAck(
        h.call_id,
        tuple(results),
        addr,
        h.flags,
        max_xmit,
        max_recv,
        group,
        h.ptype == PType.ALTER_CONTEXT_RESP,
    )


def _parse_request(h: Header, data: bytes) -> Request:
    _need(data, REQUEST_HEAD.size, "request")
    *_, hint, ctx_id, opnum = REQUEST_HEAD.unpack_from(data)
    object_uuid = None
    stub_at = 24
    if h.flags & Flags.OBJECT_UUID:
        _need(data, 40, "request with object UUID")
        object_uuid = data[24:40]
        stub_at = 40
    return Request(h.call_id, ctx_id, data[stub_at:], opnum, h.flags, hint, object_uuid)


def _parse_response(h: Header, data: bytes) -> Response:
    _need(data, RESPONSE_HEAD.size, "response")
    *_, hint, ctx_id, cancel = RESPONSE_HEAD.unpack_from(data)
    return Response(h.call_id, ctx_id, data[24:], h.flags, hint, cancel)


def _parse_fault(h: Header, data: bytes) -> Fault:
    _need(data, 28, "fault")
    hint, ctx_id, cancel, status = struct.unpack_from("<IHBxI", data, 16)
    return Fault(h.call_id, ctx_id, status, h.flags, hint, cancel)


def _parse_bind_nak(h: Header, data: bytes) -> BindNak:
    _need(data, 19, "bind_nak")
    reason, count = struct.unpack_from("<HB", data, 16)
    _need(data, 19 + 2 * count, "bind_nak versions")
    versions = tuple(struct.unpack_from("<BB", data, 19 + 2 * i) for i in range(count))
    return BindNak(h.call_id, reason, versions)


_PARSERS: dict[int, Callable[[Header, bytes], Pdu]] = {
    PType.BIND: _parse_bind,
    PType.ALTER_CONTEXT: _parse_bind,
    PType.BIND_ACK: _parse_bind_ack,
    PType.ALTER_CONTEXT_RESP: _parse_bind_ack,
    PType.BIND_NAK: _parse_bind_nak,
    PType.REQUEST: _parse_request,
    PType.RESPONSE: _parse_response,
    PType.FAULT: _parse_fault,
}


def parse_pdu(data: bytes, header: Header | None = None) -> Pdu:
    """Decode one whole little-endian, unauthenticated PDU (exactly frag_length bytes);
    `header`: its header, when the caller has parsed it already."""
    _need(data, HEADER_SIZE, "header")
    h = header or parse_header(data)
    if h.frag_length != len(data):
        raise PduError(f"frag_length {h.frag_length} but {len(data)} bytes given")
    if h.drep & 0xF0 != DREP_LE:
        raise PduError(f"data representation {h.drep:#010x} is not little-endian")
    if h.auth_length:
        raise PduError(f"authenticated PDU (auth_length {h.auth_length})")
    parser = _PARSERS.get(h.ptype)
    if parser is None:
        return OtherPdu(h, data[HEADER_SIZE:])
    return parser(h, data)
