"""What a strict client checks in every PDU and reply it receives (docs/protocol.md,
"What a strict client checks").

Each failed check raises NotGenuine naming it; the check names are stable (they appear
in `kmsclient --json` output and exit status 6). Checks that vlmcs only warns about are
returned as warning strings instead.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from . import ndr
from .epid import Epid, parse_epid
from .errors import NotGenuine, StubError
from .kms import BaseRequest, KmsResponse, decode_response
from .rpc import (
    BTFN_FEATURES,
    DREP_LE,
    HEADER_SIZE,
    MAX_FRAG,
    NDR64,
    NIL_SYNTAX,
    RPC_VERSION,
    WHOLE,
    BindAck,
    Flags,
    Header,
    PType,
    Reason,
    Result,
    Syntax,
    btfn_features,
    parse_header,
)

WINE_CALL_ID = 1  # vlmcs tolerates call_id 1 in replies (a known Wine bug)


def check_header(head: bytes) -> int:
    """Check the 16-byte common header of a received PDU before its body is read;
    returns frag_length. A non-RPC service on the port fails here."""
    h = parse_header(head)
    if h.version != RPC_VERSION:
        raise NotGenuine(
            "rpc_version",
            f"reply is not DCE-RPC 5.0 (first bytes {head[:8].hex(' ')}); is this a KMS host?",
        )
    if h.drep != DREP_LE:
        raise NotGenuine("rpc_drep", f"data representation {h.drep:#010x}, expected 0x10")
    if h.auth_length:
        raise NotGenuine("rpc_auth_length", f"auth_length {h.auth_length}, expected 0")
    if not HEADER_SIZE <= h.frag_length <= MAX_FRAG:
        raise NotGenuine("rpc_frag_length", f"frag_length {h.frag_length}")
    return h.frag_length


def check_pdu(h: Header, ptype: PType, call_id: int, warnings: list[str]) -> None:
    """PTYPE, fragment flags and call_id echo of a whole received PDU, by its header."""
    if h.ptype != ptype:
        raise NotGenuine("rpc_ptype", f"expected {ptype.name.lower()}, got PTYPE {h.ptype}")
    if h.flags & WHOLE != WHOLE:
        raise NotGenuine("rpc_frag_flags", f"pfc_flags {h.flags:#04x} is not a whole fragment")
    if h.call_id != call_id:
        if h.call_id != WINE_CALL_ID:
            raise NotGenuine("rpc_call_id", f"call_id {h.call_id}, expected {call_id}")
        warnings.append("reply has call_id 1 instead of the request's (the Wine bug)")


@dataclass(frozen=True, slots=True)
class Offered:
    """One context element a client offered: its id and its single transfer syntax."""

    context_id: int
    syntax: Syntax


def check_bind_ack(ack: BindAck, offered: list[Offered], warnings: list[str]) -> dict[int, bool]:
    """The bind_ack checks vlmcs makes (docs/protocol.md, Binding); returns the accepted contexts
    (p_cont_id -> NDR64)."""
    kind = "alter_context_resp" if ack.alter else "bind_ack"
    if len(ack.results) != len(offered):
        raise NotGenuine(
            "bind_results", f"{kind} has {len(ack.results)} results for {len(offered)} contexts"
        )
    accepted: dict[int, bool] = {}
    for item, res in zip(offered, ack.results, strict=True):
        where = f"{kind} result for context {item.context_id}"
        if btfn_features(item.syntax) is not None:
            if (res.result, res.reason) != (Result.NEGOTIATE_ACK, BTFN_FEATURES):
                expected = f"{Result.NEGOTIATE_ACK:d}/{BTFN_FEATURES}"
                warnings.append(f"{where}: BTFN answered {res.result}/{res.reason}, not {expected}")
            continue
        if res.result == Result.PROVIDER_REJECTION:
            if res.syntax != NIL_SYNTAX:
                warnings.append(f"{where}: refused entry names a transfer syntax")
            if res.reason != Reason.TRANSFER_SYNTAXES_NOT_SUPPORTED:
                warnings.append(f"{where}: refused with reason {res.reason}, not 2")
            continue
        if res.result != Result.ACCEPTANCE:
            raise NotGenuine("bind_result", f"{where}: result {res.result}")
        if res.syntax.uuid != item.syntax.uuid:
            raise NotGenuine("bind_syntax", f"{where}: accepted a syntax that was not offered")
        if res.syntax.version != item.syntax.version:
            raise NotGenuine("bind_syntax_version", f"{where}: version {res.syntax.version}")
        if res.reason:
            warnings.append(f"{where}: accepted with reason {res.reason}")
        accepted[item.context_id] = item.syntax == NDR64
    if not accepted:
        raise NotGenuine("bind_no_syntax", f"{kind} accepted neither NDR32 nor NDR64")
    return accepted


def check_response_stub(
    stub: bytes, alloc_hint: int, ndr64: bool, warnings: list[str]
) -> tuple[bytes, int]:
    """The NDR checks of a response stub: (KMS response, return value)."""
    try:
        payload, status = ndr.unwrap_response(stub, ndr64)
    except StubError as exc:
        raise NotGenuine("ndr_size", str(exc)) from None
    if not payload:
        if not status:
            raise NotGenuine("ndr_referent", "NULL response pointer with return value 0")
        return payload, status
    length = ndr.response_length(len(payload), ndr64)
    if alloc_hint != length:
        warnings.append(f"alloc_hint {alloc_hint}, expected {length}")
    if any(ndr.response_padding(stub, len(payload), ndr64)):
        warnings.append("NDR pad bytes are not zero")
    if len(stub) > length:
        warnings.append(f"{len(stub) - length} bytes after the return value")
    return payload, status


def check_flags_clear(flags: int, warnings: list[str]) -> None:
    """alter_context_resp, response and fault must not set PFC_CONC_MPX (vlmcs warns)."""
    if flags & Flags.CONC_MPX:
        warnings.append("reply sets PFC_CONC_MPX")


@dataclass(frozen=True, slots=True)
class Verified:
    """A KMS reply that passed every check, with its ePID decoded."""

    reply: KmsResponse
    epid: Epid


@functools.lru_cache(maxsize=64)
def _parse_epid(text: str) -> Epid:
    """parse_epid, remembered: a host answers with the same few ePIDs (Epid is immutable;
    a failure raises and is not remembered)."""
    return parse_epid(text)


def verify_reply(base: BaseRequest, iv: bytes, payload: bytes) -> Verified:
    """The KMS reply's checks (kms.decode_response), then the ePID's structure."""
    reply = decode_response(base, iv, payload)
    try:
        epid = _parse_epid(reply.base.epid)
    except ValueError as exc:
        raise NotGenuine("epid_format", str(exc)) from None
    return Verified(reply, epid)
