"""One connection to a KMS host over asyncio streams: the adapter of the sans-IO client
(kmsd.protocol.client), which makes and checks every PDU."""

from __future__ import annotations

import asyncio
import contextlib

from kmsd.protocol.checks import check_header, verify_reply
from kmsd.protocol.client import BindOptions, PreparedRequest, RpcClient, prepare
from kmsd.protocol.kms import BaseRequest, KmsResponse
from kmsd.protocol.rpc import HEADER_SIZE


class KmsConnection:
    """One TCP connection to a KMS host. Nothing here bounds time: callers wrap calls in
    asyncio.timeout."""

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
