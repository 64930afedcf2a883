"""One activation exchange, bounded in time, verified, and classified (kmsclient.outcome)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace

from kmsd.protocol.checks import Verified, verify_reply
from kmsd.protocol.client import BindOptions, PreparedRequest
from kmsd.protocol.errors import HResult
from kmsd.protocol.kms import BaseRequest, product_uuid
from kmsd.protocol.products import products

from .outcome import Failure, Status, classify
from .session import KmsConnection
from .target import Target


@dataclass(frozen=True)
class CallOptions:
    bind: BindOptions = BindOptions()
    call_ndr64: bool = False  # False: first call NDR32 on context 0, as vlmcs does
    timeout: float = 5.0  # seconds for connect + bind + call


DEFAULT_OPTIONS = CallOptions()


@dataclass(frozen=True)
class Result:
    target: Target
    request: PreparedRequest
    status: Status
    verified: Verified | None = None
    failure: Failure | None = None
    context_id: int | None = None
    ndr64: bool | None = None
    response_time: float | None = None  # seconds from sending the request to its reply
    warnings: tuple[str, ...] = ()
    reconnected: bool = False  # the kept connection had been closed by the host


class Activator:
    """Sends activation requests to one host over a kept connection, reconnecting (with
    a fresh bind, as vlmcs does) when the host closed it between calls."""

    def __init__(self, target: Target, options: CallOptions = DEFAULT_OPTIONS) -> None:
        self.target = target
        self.options = options
        self.conn: KmsConnection | None = None
        self._next_call_id = 2  # vlmcs's counter continues across reconnects
        self.reconnected = False  # the latest call() found the kept connection closed

    async def _connect(self) -> KmsConnection:
        self.conn = await KmsConnection.open(
            self.target.host,
            self.target.port,
            self.options.bind,
            ndr32_first=not self.options.call_ndr64,
            first_call_id=self._next_call_id,
        )
        return self.conn

    async def call(self, prepared: PreparedRequest) -> tuple[bytes, float]:
        """Send one request over the kept connection (connecting and binding first when
        there is none; reconnecting once when the host had closed it between calls, which
        sets `reconnected`). Returns the KMS response, checked at the RPC level but not yet
        verified, and the response time. No time bound here: callers wrap it in a timeout.
        Raises what the connection or the host's reply raise (see kmsclient.outcome)."""
        self.reconnected = False
        conn = self.conn
        if conn is not None:
            conn.rpc.warnings.clear()
            try:
                return await self._call(conn, prepared)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                    raise
                self._drop()
                self.reconnected = True
        return await self._call(await self._connect(), prepared)

    async def _call(self, conn: KmsConnection, prepared: PreparedRequest) -> tuple[bytes, float]:
        start = time.perf_counter()
        try:
            payload = await conn.call(prepared, prefer_ndr64=self.options.call_ndr64)
        finally:
            self._next_call_id = conn.rpc.call_id
        return payload, time.perf_counter() - start

    async def run(self, prepared: PreparedRequest) -> Result:
        """One exchange within the timeout, verified; never raises for anything the host
        does."""
        try:
            async with asyncio.timeout(self.options.timeout):
                payload, elapsed = await self.call(prepared)
            assert self.conn is not None
            conn = self.conn
            ctx_id, ndr64 = conn.last_call
            verified = verify_reply(prepared.base, prepared.iv, payload)
            below = verified.reply.base.count < prepared.base.required_count
            return Result(
                self.target,
                prepared,
                Status.BELOW_THRESHOLD if below else Status.ACTIVATED,
                verified,
                context_id=ctx_id,
                ndr64=ndr64,
                response_time=elapsed,
                warnings=(*conn.rpc.warnings, *verified.reply.warnings),
                reconnected=self.reconnected,
            )
        except Exception as exc:
            warnings = tuple(self.conn.rpc.warnings) if self.conn is not None else ()
            failure = explain(self.fail(exc), prepared.base)
            return Result(
                self.target,
                prepared,
                failure.status,
                failure=failure,
                warnings=warnings,
                reconnected=self.reconnected,
            )

    def fail(self, exc: Exception) -> Failure:
        """Classify a failed exchange; drops the connection unless the host refused the
        call (then the connection is still in a known state)."""
        failure = classify(exc, self.options.timeout)
        if failure.status != Status.REFUSED:
            self._drop()  # the connection's state is unknown
        return failure

    def abandon(self) -> None:
        """Close the kept connection without waiting for the close to complete."""
        if self.conn is not None:
            self.conn.writer.close()
            self.conn = None

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.writer.transport.abort()
            self.conn = None

    async def close(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            conn.writer.close()
            try:
                async with asyncio.timeout(self.options.timeout):
                    await conn.writer.wait_closed()
            except (OSError, TimeoutError):
                conn.writer.transport.abort()


async def activate(
    target: Target, prepared: PreparedRequest, options: CallOptions = DEFAULT_OPTIONS
) -> Result:
    """Connect, bind, send one request, verify the reply, close."""
    activator = Activator(target, options)
    try:
        return await activator.run(prepared)
    finally:
        await activator.close()


def explain(failure: Failure, base: BaseRequest) -> Failure:
    """A KMS ID refusal of a product that no KMS host serves says which product and why."""
    if failure.hresult != HResult.KMS_ID_MISMATCH:
        return failure
    item = products().kms_items.get(product_uuid(base.kms_id))
    sku = products().skus.get(product_uuid(base.sku_id))
    if item is None or sku is None or not (item.retail or item.preview):
        return failure
    kind = "a retail" if item.retail else "a preview"
    reason = f"{sku.name} is {kind} product; KMS hosts activate volume products"
    return replace(failure, message=f"{failure.message}; {reason}")
