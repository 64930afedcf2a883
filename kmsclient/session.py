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

from kmsd.host import filetime
from kmsd.protocol import ndr
from kmsd.protocol.errors import HResult, KmsError, NotGenuine
from kmsd.protocol.kms import BaseRequest, KmsResponse, decode_response, encode_request
from kmsd.protocol.products import Sku
from kmsd.protocol.rpc import (
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
    Request,
    Response,
    Result,
    btfn_syntax,
    frag_length_of,
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
    """The host answered at the RPC level with something other than a usable response."""


@dataclass(frozen=True)
class BindOptions:
    ndr64: bool = True  # offer NDR64 besides NDR32
    btfn: bool = True  # offer bind-time feature negotiation
    multiplex: bool = True  # set PFC_CONC_MPX in the bind


class RpcClient:
    """Bind state and call ids of one connection, sans-IO."""

    def __init__(self, options: BindOptions = BindOptions(), first_call_id: int = 2) -> None:
        self.options = options
        self.call_id = first_call_id
        self.contexts: dict[int, bool] = {}  # accepted p_cont_id -> NDR64

    def bind(self) -> bytes:
        contexts = [ContextElement(0, KMS_INTERFACE, (NDR32,))]
        if self.options.ndr64:
            contexts.append(ContextElement(len(contexts), KMS_INTERFACE, (NDR64,)))
        if self.options.btfn:
            contexts.append(ContextElement(len(contexts), KMS_INTERFACE, (btfn_syntax(3),)))
        flags = WHOLE | (Flags.CONC_MPX if self.options.multiplex else 0)
        return Bind(self.call_id, tuple(contexts), flags).encode()

    def on_bind_ack(self, data: bytes) -> None:
        pdu = parse_pdu(data)
        if isinstance(pdu, BindNak):
            raise RpcError(f"bind refused (bind_nak reason {pdu.reason})")
        if not isinstance(pdu, BindAck) or pdu.call_id != self.call_id:
            raise RpcError(f"expected bind_ack for call {self.call_id}, got {pdu!r}")
        for ctx_id, result in enumerate(pdu.results):
            if result.result == Result.ACCEPTANCE and result.syntax in (NDR32, NDR64):
                self.contexts[ctx_id] = result.syntax == NDR64
        if not self.contexts:
            raise RpcError("the host accepted neither NDR32 nor NDR64")

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
        """The KMS response carried by a response PDU; raises KmsError for an HRESULT."""
        pdu = parse_pdu(data)
        call_id = self.call_id
        self.call_id += 1
        if isinstance(pdu, Fault):
            raise RpcError(f"fault 0x{pdu.status:08X}")
        if not isinstance(pdu, Response):
            raise RpcError(f"expected a response, got {pdu!r}")
        if pdu.call_id != call_id or pdu.context_id != ctx_id:
            raise RpcError(f"response for call {pdu.call_id} ctx {pdu.context_id}")
        payload, status = ndr.unwrap_response(pdu.stub, ndr64)
        if status:
            code = HResult(status) if status in HResult._value2member_map_ else HResult.S_OK
            raise KmsError(code, f"host answered HRESULT 0x{status:08X}")
        return payload


class KmsConnection:
    """One TCP connection to a KMS host over asyncio streams."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rpc: RpcClient
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.rpc = rpc

    @classmethod
    async def open(
        cls, host: str, port: int, options: BindOptions = BindOptions()
    ) -> KmsConnection:
        reader, writer = await asyncio.open_connection(host, port)
        conn = cls(reader, writer, RpcClient(options))
        writer.write(conn.rpc.bind())
        conn.rpc.on_bind_ack(await conn.read_pdu())
        return conn

    async def read_pdu(self) -> bytes:
        head = await self.reader.readexactly(HEADER_SIZE)
        return head + await self.reader.readexactly(frag_length_of(head) - HEADER_SIZE)

    async def activate(
        self, base: BaseRequest, *, prefer_ndr64: bool = True, iv: bytes | None = None
    ) -> KmsResponse:
        """One activation exchange; the reply is verified (raises NotGenuine)."""
        iv = os.urandom(16) if iv is None and base.major >= 5 else (iv or b"")
        pdu, ctx_id, ndr64 = self.rpc.request(
            encode_request(base, iv=iv), prefer_ndr64=prefer_ndr64
        )
        self.writer.write(pdu)
        payload = self.rpc.on_response(await self.read_pdu(), ctx_id, ndr64)
        return decode_response(base, iv, payload)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


__all__ = ["BindOptions", "KmsConnection", "NotGenuine", "RpcClient", "RpcError", "base_request"]
