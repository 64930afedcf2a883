"""The client side of one DCE-RPC connection to a KMS host, sans-IO (docs/protocol.md,
"DCE-RPC" and "What a strict client checks").

`RpcClient` makes the bind, the alter_context and the request PDUs and checks each PDU
received the way vlmcs does (kmsd.protocol.checks); an adapter moves the bytes. Requests
are built here too (`base_request`, `prepare`), so tests and tools need no adapter to
make one.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass

from . import ndr
from .checks import (
    Offered,
    check_bind_ack,
    check_flags_clear,
    check_pdu,
    check_response_stub,
)
from .constants import filetime
from .errors import KmsError, NotGenuine, describe_hresult
from .kms import BaseRequest, encode_request
from .products import Sku
from .rpc import (
    BTFN_FEATURES,
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
    btfn_syntax,
    parse_header,
    parse_pdu,
)

NIL_UUID = uuid.UUID(int=0)


def base_request(
    sku: Sku,
    *,
    major: int | None = None,
    client_machine_id: uuid.UUID | None = None,
    workstation: str = "kmsclient.lab.test",
    now: float | None = None,
    required_count: int | None = None,
    is_vm: int = 0,
    license_status: int = 2,
    binding_expiration: int = 43200,
    previous_client_machine_id: uuid.UUID = NIL_UUID,
) -> BaseRequest:
    """A request for `sku` with the defaults of a freshly installed volume client."""
    return BaseRequest(
        major=major or sku.kms.protocol,
        minor=0,
        is_vm=is_vm,
        license_status=license_status,
        binding_expiration=binding_expiration,
        application_id=sku.kms.application.id.bytes_le,
        sku_id=sku.id.bytes_le,
        kms_id=sku.kms.id.bytes_le,
        client_machine_id=(client_machine_id or uuid.uuid4()).bytes_le,
        required_count=sku.kms.n_policy if required_count is None else required_count,
        request_time=filetime(time.time() if now is None else now),
        previous_client_machine_id=previous_client_machine_id.bytes_le,
        workstation=workstation,
    )


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """An encoded KMS request with what is needed to verify its reply."""

    base: BaseRequest
    iv: bytes  # V5/V6 client IV; empty for V4
    message: bytes  # the KMS request as sent


def prepare(base: BaseRequest, iv: bytes | None = None) -> PreparedRequest:
    """Encode `base`; V5/V6 get a random IV unless one is given (to replay a capture)."""
    if base.major < 5:
        iv = b""
    elif iv is None:
        iv = os.urandom(16)
    return PreparedRequest(base, iv, encode_request(base, iv=iv))


class RpcError(Exception):
    """The host refused at the RPC level: a fault PDU or a bind_nak."""


class HostRefused(KmsError):
    """The host answered the call with a non-zero HRESULT (the NDR error form); `status` and
    `hresult` are the code as received, in or outside HResult."""

    def __init__(self, status: int) -> None:
        super().__init__(status, f"host answered HRESULT {describe_hresult(status)}")
        self.status = status


@dataclass(frozen=True)
class BindOptions:
    ndr64: bool = True  # offer NDR64 besides NDR32
    btfn: bool = True  # offer bind-time feature negotiation
    multiplex: bool = True  # set PFC_CONC_MPX in the bind


class RpcClient:
    """Bind state and call ids of one connection. Every PDU received is checked as vlmcs
    checks it; a failure raises NotGenuine, vlmcs's warnings collect in `warnings`."""

    def __init__(self, options: BindOptions = BindOptions(), first_call_id: int = 2) -> None:
        self.options = options
        self.call_id = first_call_id
        self.contexts: dict[int, bool] = {}  # accepted p_cont_id -> NDR64
        self.warnings: list[str] = []
        self._offered: list[Offered] = []

    @property
    def _flags(self) -> int:
        return WHOLE | (Flags.CONC_MPX if self.options.multiplex else 0)

    def bind(self) -> bytes:
        syntaxes = [NDR32]
        if self.options.ndr64:
            syntaxes.append(NDR64)
        if self.options.btfn:
            syntaxes.append(btfn_syntax(BTFN_FEATURES))
        self._offered = [Offered(i, s) for i, s in enumerate(syntaxes)]
        contexts = tuple(ContextElement(i, KMS_INTERFACE, (s,)) for i, s in enumerate(syntaxes))
        return Bind(self.call_id, contexts, self._flags).encode()

    def on_bind_ack(self, data: bytes) -> None:
        ack = self._on_ack(data, PType.BIND_ACK)
        if ack.flags & Flags.CONC_MPX != self._flags & Flags.CONC_MPX:
            self.warnings.append("bind_ack does not echo the bind's PFC_CONC_MPX")

    @property
    def needs_alter_context(self) -> bool:
        """vlmcs makes its first call in NDR32 on context 0: when the bind accepted only
        NDR64, it first asks for NDR32 with an alter_context (docs/protocol.md, Binding)."""
        return 0 not in self.contexts

    def alter_context(self) -> bytes:
        self._offered = [Offered(0, NDR32)]
        element = ContextElement(0, KMS_INTERFACE, (NDR32,))
        return Bind(self.call_id, (element,), self._flags, alter=True).encode()

    def on_alter_context_resp(self, data: bytes) -> None:
        ack = self._on_ack(data, PType.ALTER_CONTEXT_RESP)
        check_flags_clear(ack.flags, self.warnings)

    def _on_ack(self, data: bytes, ptype: PType) -> BindAck:
        header = parse_header(data)
        if header.ptype == PType.BIND_NAK:
            nak = parse_pdu(data, header)
            assert isinstance(nak, BindNak)
            raise RpcError(f"bind refused (bind_nak reason {nak.reason})")
        check_pdu(header, ptype, self.call_id, self.warnings)
        ack = parse_pdu(data, header)
        assert isinstance(ack, BindAck)
        self.contexts.update(check_bind_ack(ack, self._offered, self.warnings))
        return ack

    def request(self, kms_request: bytes, *, prefer_ndr64: bool = True) -> tuple[bytes, int, bool]:
        """A request PDU; returns it, its p_cont_id and whether it is NDR64."""
        ctx_id = next(
            (c for c, is64 in self.contexts.items() if is64 == prefer_ndr64),
            next(iter(self.contexts)),
        )
        ndr64 = self.contexts[ctx_id]
        pdu = Request(self.call_id, ctx_id, ndr.wrap_request(kms_request, ndr64)).encode()
        return pdu, ctx_id, ndr64

    def on_response(self, data: bytes, ctx_id: int, ndr64: bool) -> bytes:
        """The KMS response carried by a response PDU; raises HostRefused (a KmsError) for
        an HRESULT, RpcError for a fault, NotGenuine for a reply no KMS host sends."""
        call_id = self.call_id
        self.call_id += 1
        header = parse_header(data)
        if header.ptype == PType.FAULT:
            check_pdu(header, PType.FAULT, call_id, self.warnings)
            fault = parse_pdu(data, header)
            assert isinstance(fault, Fault)
            raise RpcError(f"fault 0x{fault.status:08X}")
        check_pdu(header, PType.RESPONSE, call_id, self.warnings)
        check_flags_clear(header.flags, self.warnings)
        pdu = parse_pdu(data, header)
        assert isinstance(pdu, Response)
        if pdu.cancel_count:
            raise NotGenuine("rpc_cancel_count", f"cancel_count {pdu.cancel_count}")
        if pdu.context_id != ctx_id:
            raise NotGenuine("rpc_context_id", f"p_cont_id {pdu.context_id}, sent {ctx_id}")
        hint = pdu.alloc_hint if pdu.alloc_hint is not None else len(pdu.stub)
        payload, status = check_response_stub(pdu.stub, hint, ndr64, self.warnings)
        if status:
            raise HostRefused(status)
        return payload
