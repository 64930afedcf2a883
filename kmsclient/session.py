"""The client side of one connection to a KMS host: bind, then activation calls.

`RpcClient` is sans-IO (PDUs in, PDUs out); `KmsConnection` runs it over asyncio streams.
Every wire structure comes from kmsd.protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from dataclasses import dataclass

from kmsd.protocol import ndr
from kmsd.protocol.constants import filetime
from kmsd.protocol.errors import HResult, KmsError, NotGenuine
from kmsd.protocol.kms import BaseRequest, KmsResponse, encode_request
from kmsd.protocol.products import Sku
from kmsd.protocol.rpc import (
    BTFN_FEATURES,
    HEADER_SIZE,
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
    parse_pdu,
)

from .verify import (
    Offered,
    check_bind_ack,
    check_flags_clear,
    check_header,
    check_pdu,
    check_response_stub,
    verify_reply,
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
        application_id=sku.kms.application.id,
        sku_id=sku.id,
        kms_id=sku.kms.id,
        client_machine_id=client_machine_id or uuid.uuid4(),
        required_count=sku.kms.n_policy if required_count is None else required_count,
        request_time=filetime(time.time() if now is None else now),
        previous_client_machine_id=previous_client_machine_id,
        workstation=workstation,
    )


class RpcError(Exception):
    """The host refused at the RPC level: a fault PDU or a bind_nak."""


class HostRefused(KmsError):
    """The host answered the call with a non-zero HRESULT (the NDR error form)."""

    def __init__(self, status: int) -> None:
        known = status in HResult._value2member_map_
        name = HResult(status).name if known else "unknown"
        super().__init__(
            HResult(status) if known else HResult.S_OK,
            f"host answered HRESULT 0x{status:08X} ({name})",
        )
        self.status = status


@dataclass(frozen=True)
class BindOptions:
    ndr64: bool = True  # offer NDR64 besides NDR32
    btfn: bool = True  # offer bind-time feature negotiation
    multiplex: bool = True  # set PFC_CONC_MPX in the bind


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


class RpcClient:
    """Bind state and call ids of one connection, sans-IO. Every PDU received is checked
    as vlmcs checks it (kmsclient.verify); a failure raises NotGenuine, vlmcs's warnings
    collect in `warnings`."""

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
        self._on_ack(data, PType.BIND_ACK)
        if data[3] & Flags.CONC_MPX != self._flags & Flags.CONC_MPX:
            self.warnings.append("bind_ack does not echo the bind's PFC_CONC_MPX")

    @property
    def needs_alter_context(self) -> bool:
        """vlmcs makes its first call in NDR32 on context 0: when the bind accepted only
        NDR64, it first asks for NDR32 with an alter_context (PROTOCOL.md §3.7)."""
        return 0 not in self.contexts

    def alter_context(self) -> bytes:
        self._offered = [Offered(0, NDR32)]
        element = ContextElement(0, KMS_INTERFACE, (NDR32,))
        return Bind(self.call_id, (element,), self._flags, alter=True).encode()

    def on_alter_context_resp(self, data: bytes) -> None:
        self._on_ack(data, PType.ALTER_CONTEXT_RESP)
        check_flags_clear(data, self.warnings)

    def _on_ack(self, data: bytes, ptype: PType) -> None:
        if data[2] == PType.BIND_NAK:
            nak = parse_pdu(data)
            assert isinstance(nak, BindNak)
            raise RpcError(f"bind refused (bind_nak reason {nak.reason})")
        check_pdu(data, ptype, self.call_id, self.warnings)
        ack = parse_pdu(data)
        assert isinstance(ack, BindAck)
        self.contexts.update(check_bind_ack(ack, self._offered, self.warnings))

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
        if data[2] == PType.FAULT:
            check_pdu(data, PType.FAULT, call_id, self.warnings)
            fault = parse_pdu(data)
            assert isinstance(fault, Fault)
            raise RpcError(f"fault 0x{fault.status:08X}")
        check_pdu(data, PType.RESPONSE, call_id, self.warnings)
        check_flags_clear(data, self.warnings)
        pdu = parse_pdu(data)
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


class KmsConnection:
    """One TCP connection to a KMS host over asyncio streams. Nothing here bounds time:
    callers wrap calls in asyncio.timeout."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rpc: RpcClient
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.rpc = rpc
        self.last_call = (0, False)  # p_cont_id and NDR64 of the latest call

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        options: BindOptions = BindOptions(),
        *,
        ndr32_first: bool = False,
        first_call_id: int = 2,
    ) -> KmsConnection:
        """Connect and bind; with `ndr32_first`, also get NDR32 on context 0 the way vlmcs
        does when the bind accepted only NDR64."""
        reader, writer = await asyncio.open_connection(host, port)
        conn = cls(reader, writer, RpcClient(options, first_call_id))
        try:
            writer.write(conn.rpc.bind())
            conn.rpc.on_bind_ack(await conn.read_pdu())
            if ndr32_first and conn.rpc.needs_alter_context:
                writer.write(conn.rpc.alter_context())
                conn.rpc.on_alter_context_resp(await conn.read_pdu())
        except BaseException:
            writer.transport.abort()
            raise
        return conn

    async def read_pdu(self) -> bytes:
        """One PDU; the header is checked before the body is awaited, so a service that is
        not DCE-RPC is recognised at once."""
        head = await self.reader.readexactly(HEADER_SIZE)
        return head + await self.reader.readexactly(check_header(head) - HEADER_SIZE)

    async def call(self, prepared: PreparedRequest, *, prefer_ndr64: bool = False) -> bytes:
        """Send one request; the KMS response it carries, checked at the RPC level."""
        pdu, ctx_id, ndr64 = self.rpc.request(prepared.message, prefer_ndr64=prefer_ndr64)
        self.last_call = (ctx_id, ndr64)
        self.writer.write(pdu)
        return self.rpc.on_response(await self.read_pdu(), ctx_id, ndr64)

    async def activate(
        self, base: BaseRequest, *, prefer_ndr64: bool = True, iv: bytes | None = None
    ) -> KmsResponse:
        """One activation exchange; the reply is verified (raises NotGenuine)."""
        prepared = prepare(base, iv)
        payload = await self.call(prepared, prefer_ndr64=prefer_ndr64)
        return verify_reply(base, prepared.iv, payload).reply

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


__all__ = [
    "BindOptions",
    "HostRefused",
    "KmsConnection",
    "NotGenuine",
    "PreparedRequest",
    "RpcClient",
    "RpcError",
    "base_request",
    "prepare",
]
