"""The server side of one DCE-RPC connection, sans-IO (docs/protocol.md, DCE-RPC, Binding).

Feed it the bytes that arrive; it answers binds and alter_contexts itself and hands
back each complete RequestActivation call for the host to answer. It never raises on
input: whatever a peer sends ends as a reply, a fault, a bind_nak or a Close.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import ndr
from .errors import FaultStatus, StubError
from .kms import request_version
from .rpc import (
    BTFN_FEATURES,
    DREP_LE,
    HEADER_SIZE,
    KMS_INTERFACE,
    MAX_FRAG,
    MUST_RECV_FRAG,
    NDR32,
    NDR64,
    REQUEST_HEAD,
    RPC_VERSION,
    WHOLE,
    Bind,
    BindAck,
    BindNak,
    ContextResult,
    Fault,
    Flags,
    NakReason,
    OtherPdu,
    PduError,
    PType,
    Reason,
    Request,
    Result,
    Syntax,
    btfn_features,
    frag_length_of,
    parse_header,
    parse_pdu,
    response_pdu,
)

MAX_PENDING_CALLS = 4  # requests being reassembled at once on one connection
# PTYPEs as plain ints (an enum member costs a class lookup on the per-PDU path)
_REQUEST = int(PType.REQUEST)
_BINDS = (int(PType.BIND), int(PType.ALTER_CONTEXT))
_REQUEST_SIZE = REQUEST_HEAD.size
_ONE_FRAGMENT = Flags.FIRST_FRAG | Flags.LAST_FRAG | Flags.OBJECT_UUID  # bits _whole_request reads


@dataclass(slots=True)  # made per bind; not frozen, whose __init__ costs 3x
class Send:
    """Bytes to write to the peer. When they refuse bad input, `refusal` is the fault or
    bind_nak they encode and `problem` says what was wrong with the input."""

    data: bytes
    problem: str | None = None
    refusal: Fault | BindNak | None = None


@dataclass(frozen=True, slots=True)
class Close:
    """Stop reading and close the connection after writing what came before."""

    reason: str


@dataclass(slots=True)  # made per request; not frozen, whose __init__ costs 3x
class Call:
    """A complete RequestActivation call for the host to answer."""

    call_id: int
    context_id: int
    ndr64: bool
    payload: bytes

    @property
    def version(self) -> tuple[int, int] | None:
        """The KMS protocol version (major, minor) the request claims, if any."""
        return request_version(self.payload)

    # A KMS response stub (at most 288 bytes) always fits the 1432-byte fragment every
    # DCE-RPC peer must accept, so responses are never fragmented.

    def reply(self, kms_response: bytes) -> bytes:
        return response_pdu(
            self.call_id, self.context_id, ndr.wrap_response(kms_response, self.ndr64)
        )

    def reply_error(self, hresult: int) -> bytes:
        return response_pdu(self.call_id, self.context_id, ndr.wrap_error(hresult, self.ndr64))

    def fault(self, status: int) -> bytes:
        """Refuse the call without executing it (e.g. nca_s_server_too_busy)."""
        return Fault(self.call_id, self.context_id, status).encode()


Event = Send | Close | Call


class AssociationGroups:
    """Association group ids shared by the connections of one server."""

    def __init__(self, first: int) -> None:
        self._next = first & 0xFFFFFFFF or 1
        self._members: dict[int, int] = {}

    def join(self, requested: int) -> int:
        """Join the requested group if it exists, else open a new one; returns its id."""
        if requested in self._members:
            self._members[requested] += 1
            return requested
        while self._next in self._members or self._next == 0:
            self._next = (self._next + 1) & 0xFFFFFFFF
        group = self._next
        self._next = (self._next + 1) & 0xFFFFFFFF
        self._members[group] = 1
        return group

    def leave(self, group: int) -> None:
        if group in self._members:
            self._members[group] -= 1
            if not self._members[group]:
                del self._members[group]

    def __len__(self) -> int:
        return len(self._members)


@dataclass(slots=True)
class _Partial:
    context_id: int
    opnum: int
    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    dropped: bool = False  # refused already; its remaining fragments are skipped


# A bind's answer: the bind's first 12 bytes and bytes 16:20, the connection's secondary
# address; the ack's bytes 0:12, 16:20 and 24: (around the call id and the group); the
# contexts it accepted (id, is NDR64).
_Answer = tuple[bytes, bytes, bytes, bytes, bytes, bytes, tuple[tuple[int, bool], ...]]


class BindAnswers(dict[bytes, _Answer]):
    """Answers to binds already negotiated, shared by the connections of one server.

    A bind's answer depends only on its own bytes (but for its call id and requested
    association group), on the connection's port and on the server's settings, which are
    the same for every connection of a server; real clients send the same few binds over
    and over. So each answer is kept, under the bind's bytes from 24 on (its contexts), with
    the rest of the bind it answers and the parts of the ack around the call id and the
    group; the next identical bind is answered by putting its call id and association group
    in between, without parsing or negotiating again. At most `size` answers are kept. (A
    dict itself, so that looking an answer up is dict.get, no Python call.)
    """

    def __init__(self, size: int = 256) -> None:
        super().__init__()
        self.size = size

    def put(
        self, bind: bytes, sec_addr: bytes, ack: bytes, accepted: tuple[tuple[int, bool], ...]
    ) -> None:
        if len(self) >= self.size:
            self.clear()  # binds nobody sends twice (a fuzzer): start afresh
        around = (ack[:12], ack[16:20], ack[24:])
        self[bind[24:]] = (bind[:12], bind[16:20], sec_addr, *around, accepted)


class ServerConnection:
    """State of one connection: bound contexts, association group, fragments in flight."""

    def __init__(
        self,
        *,
        port: int,
        groups: AssociationGroups,
        ndr64: bool = True,
        btfn: bool = True,
        max_pdu: int = MAX_FRAG,
        max_call: int = 16384,
        answers: BindAnswers | None = None,
    ) -> None:
        """`answers`: the server's memo of bind answers (kept only when given), which
        must not outlive the other arguments' values."""
        self._answers = answers
        self._sec_addr = str(port).encode("ascii")
        self._groups = groups
        self._ndr64 = ndr64
        self._btfn = btfn
        self._max_pdu = max_pdu
        self._max_call = max_call
        self._buffer = bytearray()
        self._contexts: dict[int, bool] = {}  # p_cont_id -> is NDR64
        self._group = 0
        self._partials: dict[int, _Partial] = {}
        self.closed = False

    def feed(self, data: bytes) -> list[Event]:
        """Take bytes from the peer; returns what to do, in order."""
        if self.closed:
            return []
        size = len(data)
        if (
            not self._buffer
            and HEADER_SIZE <= size <= self._max_pdu
            # frag_length_of(data) == size, the little-endian case read in place
            and (data[8] | data[9] << 8 if data[4] & 0xF0 == DREP_LE else frag_length_of(data))
            == size
        ):
            # The usual case: one whole PDU, not buffered; most often a request.
            if data[2] == _REQUEST and size >= _REQUEST_SIZE:
                call = self._whole_request(data)
                if call is not None:
                    return [call]
            return self._handle(data)
        events: list[Event] = []
        self._buffer += data
        while len(self._buffer) >= HEADER_SIZE and not self.closed:
            length = frag_length_of(self._buffer)
            if length < HEADER_SIZE or length > self._max_pdu:
                events.append(self._close(f"PDU frag_length {length} outside 16..{self._max_pdu}"))
                break
            if len(self._buffer) < length:
                break
            pdu = bytes(self._buffer[:length])
            del self._buffer[:length]
            events.extend(self._handle(pdu))
        return events

    def pending_bytes(self) -> int:
        """Bytes received but not yet handled (a PDU still arriving)."""
        if not self._partials:
            return len(self._buffer)
        return len(self._buffer) + sum(p.size for p in self._partials.values())

    def close(self) -> None:
        """Release what the connection holds (its association group)."""
        self.closed = True
        if self._group:
            self._groups.leave(self._group)
            self._group = 0

    def _close(self, reason: str) -> Close:
        self.close()
        return Close(reason)

    def _handle(self, data: bytes) -> list[Event]:
        """One whole PDU (exactly frag_length bytes)."""
        ptype = data[2]
        if ptype in _BINDS and self._answers is not None:
            # Everything but the call id (12:16) and the requested group (20:24) is compared.
            # Only binds that passed the checks below are remembered, and bytes 0:12
            # (version, auth_length) are compared, so a bind found here passes them too.
            known = self._answers.get(data[24:])
            if known is not None:
                head, middle, sec_addr, ack_head, ack_middle, ack_tail, accepted = known
                if (
                    data.startswith(head)
                    and data.startswith(middle, 16)
                    and sec_addr == self._sec_addr
                ):
                    if not self._group:
                        self._group = self._groups.join(int.from_bytes(data[20:24], "little"))
                    self._contexts.update(accepted)
                    group = self._group.to_bytes(4, "little")
                    return [Send(b"".join((ack_head, data[12:16], ack_middle, group, ack_tail)))]
        h = parse_header(data)
        is_bind = h.ptype in (PType.BIND, PType.ALTER_CONTEXT)
        if h.version != RPC_VERSION:
            problem = f"RPC version {h.version[0]}.{h.version[1]} not supported"
            if is_bind:
                return self._nak(h.call_id, NakReason.PROTOCOL_VERSION_NOT_SUPPORTED, problem)
            if h.ptype == PType.REQUEST:
                return [
                    self._fault(h.call_id, 0, FaultStatus.PROTO_ERROR, problem),
                    self._close(problem),
                ]
            return [self._close(problem)]
        if h.auth_length and is_bind:
            return self._nak(
                h.call_id,
                NakReason.AUTHENTICATION_TYPE_NOT_RECOGNIZED,
                "authenticated bind; KMS is anonymous",
            )
        try:
            pdu = parse_pdu(data, h)
        except PduError as exc:
            if is_bind:
                return self._nak(h.call_id, NakReason.NOT_SPECIFIED, str(exc))
            if h.ptype == PType.REQUEST:
                return [self._fault(h.call_id, 0, FaultStatus.PROTO_ERROR, str(exc))]
            return [self._close(str(exc))]
        if isinstance(pdu, Bind):
            ack, accepted = self._bind(pdu)
            if self._answers is not None:
                self._answers.put(data, self._sec_addr, ack, accepted)
            return [Send(ack)]
        if isinstance(pdu, Request):
            return self._request(pdu)
        if isinstance(pdu, OtherPdu) and pdu.header.ptype in (PType.CO_CANCEL, PType.ORPHANED):
            # Calls are answered as soon as they are complete; nothing is left to cancel.
            self._partials.pop(pdu.header.call_id, None)
            return []
        return [self._close(f"unexpected PDU type {h.ptype} from a client")]

    def _nak(self, call_id: int, reason: NakReason, problem: str) -> list[Event]:
        nak = BindNak(call_id, reason)
        return [Send(nak.encode(), problem, nak), self._close(problem)]

    def _fault(self, call_id: int, context_id: int, status: FaultStatus, problem: str) -> Send:
        fault = Fault(call_id, context_id, status)
        return Send(fault.encode(), problem, fault)

    def _bind(self, bind: Bind) -> tuple[bytes, tuple[tuple[int, bool], ...]]:
        """The ack and the contexts it accepted (id, is NDR64)."""
        if not self._group:
            self._group = self._groups.join(bind.assoc_group)
        ndr64_possible = self._ndr64 and any(NDR64 in c.transfers for c in bind.contexts)
        results = []
        accepted = []
        for ctx in bind.contexts:
            result = self._negotiate(ctx.abstract, ctx.transfers, ndr64_possible)
            if result.result == Result.ACCEPTANCE:
                self._contexts[ctx.context_id] = result.syntax == NDR64
                accepted.append((ctx.context_id, result.syntax == NDR64))
            results.append(result)
        ack = BindAck(
            call_id=bind.call_id,
            results=tuple(results),
            sec_addr=b"" if bind.alter else self._sec_addr,
            # Echo the multiplexing bit in bind_ack only (docs/protocol.md, DCE-RPC).
            flags=WHOLE | (0 if bind.alter else bind.flags & Flags.CONC_MPX),
            max_xmit_frag=max(MUST_RECV_FRAG, min(bind.max_recv_frag, self._max_pdu)),
            max_recv_frag=max(MUST_RECV_FRAG, min(bind.max_xmit_frag, self._max_pdu)),
            assoc_group=self._group,
            alter=bind.alter,
        )
        return ack.encode(), tuple(accepted)

    def _negotiate(
        self, abstract: Syntax, transfers: tuple[Syntax, ...], ndr64_possible: bool
    ) -> ContextResult:
        for syntax in transfers:
            offered = btfn_features(syntax)
            if offered is not None:
                if self._btfn:
                    return ContextResult(Result.NEGOTIATE_ACK, offered & BTFN_FEATURES)
                return ContextResult(
                    Result.PROVIDER_REJECTION, Reason.TRANSFER_SYNTAXES_NOT_SUPPORTED
                )
        if abstract != KMS_INTERFACE:
            return ContextResult(Result.PROVIDER_REJECTION, Reason.ABSTRACT_SYNTAX_NOT_SUPPORTED)
        wanted = NDR64 if ndr64_possible else NDR32
        if wanted in transfers:
            return ContextResult(Result.ACCEPTANCE, 0, wanted)
        return ContextResult(Result.PROVIDER_REJECTION, Reason.TRANSFER_SYNTAXES_NOT_SUPPORTED)

    def _request(self, req: Request) -> list[Event]:
        first = bool(req.flags & Flags.FIRST_FRAG)
        last = bool(req.flags & Flags.LAST_FRAG)
        if first:
            # Refuse a call at its first fragment, not after waiting for all of them.
            refusal = self._refusal(req)
            if refusal is not None:
                if not last and len(self._partials) < MAX_PENDING_CALLS:
                    self._partials[req.call_id] = _Partial(req.context_id, req.opnum, dropped=True)
                return [refusal]
        if not (first and last):
            stub = self._reassemble(req, first, last)
            if isinstance(stub, Send):
                return [stub]
            if stub is None:
                return []
            partial, whole = stub
            req = Request(req.call_id, partial.context_id, whole, partial.opnum)
        ndr64 = self._contexts[req.context_id]
        try:
            payload = ndr.unwrap_request(req.stub, ndr64)
        except StubError as exc:
            return [
                self._fault(
                    req.call_id,
                    req.context_id,
                    FaultStatus.BAD_STUB_DATA,
                    f"bad {'NDR64' if ndr64 else 'NDR32'} stub: {exc}",
                )
            ]
        return [Call(req.call_id, req.context_id, ndr64, payload)]

    def _whole_request(self, data: bytes) -> Call | None:
        """The usual request, read without parse_pdu: version 5.0, little-endian, not
        authenticated, in one fragment without an object UUID, opnum 0, on a bound
        context, with a good stub. None for any other (the general path answers it)."""
        vers, minor, _, flags, drep, _, auth, call_id, _, ctx, opnum = REQUEST_HEAD.unpack_from(
            data
        )
        ndr64 = self._contexts.get(ctx)
        if (
            ndr64 is None
            or (vers, minor) != RPC_VERSION
            or flags & _ONE_FRAGMENT != WHOLE
            or drep & 0xF0 != DREP_LE
            or auth
            or opnum
        ):
            return None
        try:
            return Call(call_id, ctx, ndr64, ndr.unwrap_request(data[_REQUEST_SIZE:], ndr64))
        except StubError:
            return None  # the general path says what is wrong with it

    def _refusal(self, req: Request) -> Send | None:
        """The fault for a call this connection cannot execute, if it is one."""
        if req.context_id not in self._contexts:
            return self._fault(
                req.call_id,
                req.context_id,
                FaultStatus.UNK_IF,
                f"request on unbound presentation context {req.context_id}",
            )
        if req.opnum != 0:
            return self._fault(
                req.call_id,
                req.context_id,
                FaultStatus.OP_RNG_ERROR,
                f"opnum {req.opnum}; the KMS interface has only opnum 0",
            )
        return None

    def _reassemble(
        self, req: Request, first: bool, last: bool
    ) -> Send | tuple[_Partial, bytes] | None:
        if first:
            if len(self._partials) >= MAX_PENDING_CALLS:
                return self._fault(
                    req.call_id,
                    req.context_id,
                    FaultStatus.PROTO_ERROR,
                    f"more than {MAX_PENDING_CALLS} fragmented calls at once",
                )
            partial = self._partials[req.call_id] = _Partial(req.context_id, req.opnum)
        else:
            found = self._partials.get(req.call_id)
            if found is None:
                return self._fault(
                    req.call_id,
                    req.context_id,
                    FaultStatus.PROTO_ERROR,
                    f"fragment of call {req.call_id} without a first fragment",
                )
            partial = found
        if partial.dropped:
            if last:
                del self._partials[req.call_id]
            return None
        partial.parts.append(req.stub)
        partial.size += len(req.stub)
        if partial.size > self._max_call:
            partial.dropped, partial.parts, partial.size = True, [], 0
            if last:
                del self._partials[req.call_id]
            return self._fault(
                req.call_id,
                partial.context_id,
                FaultStatus.PROTO_ERROR,
                f"fragmented call exceeds {self._max_call} bytes",
            )
        if not last:
            return None
        del self._partials[req.call_id]
        return partial, b"".join(partial.parts)
