"""asyncio TCP adapter: sockets in, the sans-IO connection and host in between, sockets out."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Protocol, cast

import structlog

from . import logs
from .addresses import is_ip, join_host_port
from .commit import Commit
from .host import KmsHost
from .journal import BIND_NAK, CLOSE, COUNT, FAULT, HRESULT, LATENCY, Journal, Record, record_of
from .limits import Admission, Network, source_of
from .metrics import UNKNOWN, Metrics
from .protocol.connection import (
    AssociationGroups,
    BindAnswers,
    Call,
    Close,
    Send,
    ServerConnection,
)
from .protocol.errors import FaultStatus, KmsError
from .protocol.kms import BaseRequest, guid_text
from .protocol.rpc import BindNak, Fault
from .rules import Rule, RuleSet

log = structlog.get_logger("kmsd")


def peer_text(address: str, port: int) -> str:
    """How a client at `address` and `port` is named in logs and tables: plain text (the
    activation line writes it as it is), whatever an interface is called."""
    text = join_host_port(address, port)
    return logs.plain(text) if "%" in address else text  # a link-local address's scope


_activation = logs.Event(
    log,
    "activation",
    (
        "client",
        "cmid",
        "workstation",
        "application",
        "product",
        "protocol",
        "ndr",
        "count",
        "required",
    ),
    ("kms_id", "below_threshold", "rule"),
    varying=("client", "cmid", "workstation"),
    plain=("client", "cmid"),  # an address and port (peer_text), a GUID's text
)

BACKLOG = 1024  # connections the kernel queues before kmsd accepts them
DRAIN_SECONDS = 5.0  # how long a stop waits for replies still being committed
MAX_TICK = 1.0  # seconds between two looks at the connections' idle and read deadlines


class Durable(Protocol):
    def barrier(self) -> Commit:
        """Completes once everything counted so far is on disk."""
        ...


@dataclass(frozen=True)
class ServerSettings:
    """The [network] options the server uses (defaults: kmsd.config.OPTIONS)."""

    listen: tuple[tuple[str, int], ...]
    idle_timeout: float  # seconds without a byte before a connection is closed
    read_timeout: float  # seconds a PDU may take to arrive once it has begun
    max_connections: int  # when all are taken, one gives way to a newcomer (limits.py)
    max_connections_per_ip: int
    allow: tuple[Network, ...]  # networks served; empty: everyone
    rate_per_ip: float  # activation requests per second per address; 0: unlimited
    max_pdu: int  # bytes; also the largest fragment offered in bind_ack
    ndr64: bool
    btfn: bool
    groups_seed: int = field(default_factory=lambda: int.from_bytes(os.urandom(4), "little"))


class KmsServer:
    """Listens on the configured addresses and serves every connection until stopped."""

    def __init__(
        self,
        host: KmsHost,
        settings: ServerSettings,
        *,
        clock: Callable[[], float] = time.time,
        store: Durable | None = None,
        rules: RuleSet | None = None,
        journal: Journal | None = None,
    ) -> None:
        """With a `store`, each reply waits until the store has committed its record.
        `rules`: behaviour rules (kmsd.rules; none by default); `journal`: where exchanges
        are recorded (default: a Journal of its default size)."""
        self.host = host
        self.rules = RuleSet() if rules is None else rules
        self.journal = Journal() if journal is None else journal
        self.settings = settings
        self.clock = clock
        self.store = store
        # While drained() waits: set when the last connection closes.
        self.all_closed: asyncio.Event | None = None
        self.groups = AssociationGroups(settings.groups_seed)
        self.bind_answers = BindAnswers()
        self.admission: Admission[_KmsProtocol] = Admission(
            settings.max_connections,
            settings.max_connections_per_ip,
            settings.allow,
            settings.rate_per_ip,
        )
        self.metrics = Metrics(host.products)
        self._servers: list[asyncio.Server] = []
        self.addresses: list[tuple[str, int]] = []
        # One timer looks at every connection's deadlines (_KmsProtocol.check_time) each
        # `tick` seconds while any is open, rather than a timer per connection: most live
        # for one activation, and arming and cancelling a timer cost more than the rest
        # of their bookkeeping. A connection is closed at most `tick` after its deadline.
        self.tick = min(settings.idle_timeout, settings.read_timeout, MAX_TICK)
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self, sockets: Sequence[socket.socket] = (), *, serving: bool = True) -> None:
        """Listen on settings.listen, or, when `sockets` are given, on those bound listening
        sockets instead (socket activation). serving=False: bound, but accepting nothing
        until start_serving() (so that privileges can be dropped in between)."""
        loop = asyncio.get_running_loop()
        for sock in sockets:
            self._servers.append(
                await loop.create_server(_factory(self, sock), sock=sock, start_serving=serving)
            )
        for host, port in () if sockets else self.settings.listen:
            try:
                if is_ip(host):
                    sock = _listen(host, port)
                    server = await loop.create_server(
                        _factory(self, sock), sock=sock, start_serving=serving
                    )
                else:
                    server = await loop.create_server(
                        lambda: _KmsProtocol(self, None),
                        host,
                        port,
                        reuse_address=True,
                        backlog=BACKLOG,
                        start_serving=serving,
                    )
            except OSError as exc:
                await self.stop()
                raise OSError(
                    exc.errno, f"cannot listen on {join_host_port(host, port)}: {exc.strerror}"
                ) from None
            self._servers.append(server)
        for server in self._servers:
            # uvloop's sockets are a list, typeshed says a tuple: through Any, a build
            # compiled with mypyc does not check them against the tuple.
            for sock in cast(Any, server).sockets:
                addr = sock.getsockname()
                self.addresses.append((addr[0], addr[1]))
        for host, port in self.addresses:
            log.info("listening", address=join_host_port(host, port), inherited=bool(sockets))

    async def start_serving(self) -> None:
        """Accept connections on sockets bound by start(serving=False)."""
        for server in self._servers:
            await server.start_serving()

    async def stop(self) -> None:
        """Stop listening; close each connection once its replies are out (replies still
        waiting for the store go when it commits)."""
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.close_when_flushed()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    async def drained(self, timeout: float = DRAIN_SECONDS) -> None:
        """Wait until every connection is closed (after stop() and the store's last commit)."""
        if self.connections:
            self.all_closed = asyncio.Event()
            try:
                await asyncio.wait_for(self.all_closed.wait(), timeout)
            except TimeoutError:
                for conn in list(self.connections):
                    conn.transport.abort()
            finally:
                self.all_closed = None

    @property
    def connections(self) -> list[_KmsProtocol]:
        return list(self.admission.connections())

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """A connection opened: make sure the sweep runs."""
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.tick, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for conn in list(self.admission.connections()):
            conn.check_time(now)
        self._sweeper = (
            loop.call_later(self.tick, self._sweep, loop) if self.admission.open else None
        )

    @property
    def serving(self) -> bool:
        """Accepting connections on every listening socket."""
        return bool(self._servers) and all(s.is_serving() for s in self._servers)


def _after(delay: float, committed: Commit | None) -> Commit:
    """A commit done `delay` seconds from now, once `committed` (if any) is."""
    later = Commit()

    def due() -> None:
        if committed is None:
            later.settle()
        else:
            committed.add_done_callback(lambda done: later.settle(done.exception()))

    asyncio.get_running_loop().call_later(delay, due)
    return later


def _factory(server: KmsServer, sock: socket.socket) -> Callable[[], _KmsProtocol]:
    """Protocols for the connections of one listening socket, which know its port (the
    secondary address of bind_ack) without a getsockname() per connection."""
    port = sock.getsockname()[1]
    return lambda: _KmsProtocol(server, port)


def _listen(ip: str, port: int) -> socket.socket:
    """A listening socket on an IP address, made here rather than by the loop, whose name
    resolution would start a pool of threads (uvloop: four) that then idle for ever."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio does
        sock.bind((ip, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _KmsProtocol(asyncio.Protocol):
    transport: asyncio.Transport
    loop_time: Callable[[], float]  # the loop's time(), from connection_made on

    def __init__(self, server: KmsServer, port: int | None) -> None:
        """`port`: the listening socket's, when known (else asked of each connection)."""
        self.server = server
        self.port = port
        self.conn: ServerConnection | None = None
        self.peer = "?"
        self.address = "?"
        self.source = "?"  # whose share of the connections it counts against
        self.last_seen = 0.0
        self.partial_since: float | None = None  # when the PDU still arriving began
        # Replies in order, each with the commit it waits for (None: nothing to wait for),
        # when its request was complete (loop time; 0.0: not a reply to a call) and its
        # journal entry (which learns the reply's latency).
        self.outbox: deque[tuple[bytes, Commit | None, float, Record | None]] = deque()
        self.closing = False
        self.fresh = True  # nothing received yet (bind_nak rules look at the first PDU)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's: not a subclass
        server = self.server
        peer = transport.get_extra_info("peername")
        if peer:
            address = self.address = peer[0]
            self.peer = peer_text(address, peer[1])
        loop = asyncio.get_running_loop()
        self.loop_time = loop.time
        now = loop.time()
        source = self.source = source_of(self.address)
        refused, victim = server.admission.admit(self.address, self, now, source)
        if victim is not None:
            victim.evict()
        if refused is not None:
            log.warning(
                "connection refused", client=self.peer, reason=server.admission.explain(refused)
            )
            server.metrics.refused_connection(refused)
            self.transport.abort()
            return
        server.metrics.accepted += 1
        settings = server.settings
        self.conn = ServerConnection(
            port=self.port or transport.get_extra_info("sockname")[1],
            groups=server.groups,
            ndr64=settings.ndr64,
            btfn=settings.btfn,
            max_pdu=settings.max_pdu,
            answers=server.bind_answers,
        )
        self.last_seen = now
        if server._sweeper is None:
            server.watch(loop)
        if logs.debug_enabled:  # not even the call when nobody reads it
            log.debug("connection opened", client=self.peer)

    def check_time(self, now: float) -> None:
        """Close a connection that is idle too long, or whose PDU arrives too slowly."""
        if self.transport.is_closing():  # closed at the last look, or by its peer
            return
        settings = self.server.settings
        if self.partial_since is not None and now >= self.partial_since + settings.read_timeout:
            log.warning(
                "closing connection",
                client=self.peer,
                reason=f"PDU incomplete after {settings.read_timeout:g} s",
            )
        elif now >= self.last_seen + settings.idle_timeout:
            log.debug("connection idle, closing", client=self.peer)
        else:
            return
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None or self.closing:
            return
        now = self.last_seen = self.loop_time()
        if self.fresh:
            self.fresh = False
            if self.server.rules.binds and self._refuse_bind(data):
                return
        for event in conn.feed(data):
            if type(event) is Call:
                if not self.server.admission.requested(self.source, self, now):
                    log.warning("request refused", client=self.peer, reason="rate limit")
                    self.server.metrics.error("fault", "SERVER_TOO_BUSY")
                    self._journal(
                        event, None, FAULT, FaultStatus.SERVER_TOO_BUSY, None, "rate limit"
                    )
                    self._send(event.fault(FaultStatus.SERVER_TOO_BUSY), None)
                    continue
                try:
                    self._answer(event, perf_counter())
                except Exception:
                    # A bug, not bad input: say so loudly, drop this client, serve the rest.
                    log.exception("internal error, closing connection", client=self.peer)
                    self.server.metrics.error("internal")
                    self.transport.abort()
                    return
            elif type(event) is Send:
                if event.problem:
                    log.warning("bad input", client=self.peer, problem=event.problem)
                    self.server.metrics.bad_input(event.refusal)
                if self.outbox:
                    self._send(event.data, None)
                else:
                    self.transport.write(event.data)
            elif type(event) is Close:
                log.warning("closing connection", client=self.peer, reason=event.reason)
                self.server.metrics.error("close")
                self.close_when_flushed()
        if conn.pending_bytes():
            if self.partial_since is None:
                self.partial_since = now
        else:
            self.partial_since = None

    def _send(
        self,
        data: bytes,
        committed: Commit | None,
        started: float = 0.0,
        entry: Record | None = None,
    ) -> None:
        """Write `data` in order, once `committed` is; `started`: when the request it
        answers was complete (for the latency metric and the journal `entry`)."""
        if not self.outbox and committed is None:
            self.transport.write(data)
            if started:
                latency = perf_counter() - started
                self.server.metrics.replied(latency)
                if entry is not None:
                    entry[LATENCY] = latency
            return
        self.outbox.append((data, committed, started, entry))
        if committed is not None:
            committed.add_done_callback(self._flush)

    def _flush(self, _: object = None) -> None:
        outbox = self.outbox
        now = 0.0
        while outbox:
            data, committed, started, entry = outbox[0]
            if committed is not None:
                if not committed.settled:
                    return
                if committed.error is not None:
                    # Not durable, so not acknowledged: the client will ask again.
                    log.error(
                        "reply dropped, its record could not be committed",
                        client=self.peer,
                        error=str(committed.error),
                    )
                    outbox.clear()
                    self.transport.abort()
                    return
            outbox.popleft()
            if not self.transport.is_closing():
                self.transport.write(data)
                if started:
                    now = now or perf_counter()
                    self.server.metrics.replied(now - started)
                    if entry is not None:
                        entry[LATENCY] = now - started
        if self.closing:
            self.transport.close()

    def close_when_flushed(self) -> None:
        self.closing = True
        if not self.outbox:
            self.transport.close()

    def _answer(self, call: Call, started: float) -> None:
        """Answer a call and send the reply (`started`: when the call was complete, by
        time.perf_counter: the loop's clock has whole milliseconds under uvloop)."""
        server = self.server
        now = server.clock()
        host = server.host
        rule: Rule | None = None
        try:
            decoded = host.decode(call.payload)
            if server.rules.rules:  # the list: no __bool__ call per request
                rule = server.rules.match(decoded.base, self.address, now)
                if rule is not None and self._act(call, rule, decoded.base, now, started):
                    return
            payload, activation = host.respond(
                decoded, now, self.peer, None if rule is None else rule.response
            )
        except KmsError as exc:
            asked = exc.request
            named: dict[str, str] = {}
            if asked is not None:  # decoded: keep what the request named
                application, product = self.server.host.names(asked)
                named = {
                    "cmid": asked.cmid_text,
                    "workstation": asked.workstation,
                    "application": application,
                    "product": product,
                }
            log.warning(
                "request refused",
                client=self.peer,
                reason=exc.reason,
                hresult=f"0x{exc.hresult:08X}",
                **named,
            )
            self.server.metrics.refusal(
                exc.hresult,
                call.version,
                self.peer,
                now,
                application=named.get("application", UNKNOWN),
                product=named.get("product", UNKNOWN),
                workstation=named.get("workstation", ""),
            )
            entry = self._journal(call, asked, HRESULT, exc.hresult, rule, exc.reason)
            self._reply(call.reply_error(exc.hresult), started, entry, rule)
            return
        request = activation.request
        protocol = f"{request.major}.{request.minor}"
        if logs.info_enabled:  # not even the fields when nobody reads them
            _activation.emit(
                self.peer,
                request.cmid_text,
                request.workstation,
                activation.application,
                activation.product,
                protocol,
                "NDR64" if call.ndr64 else "NDR32",
                activation.count,
                request.required_count,
                None if activation.known else f"unknown {guid_text(request.kms_id)}",
                None
                if activation.count >= request.required_count
                else f"count {activation.count} of {request.required_count}: not activated "
                f"yet; a small lab can start kmsd with --precharge {request.required_count - 1}",
                None if rule is None else rule.name,
            )
        server.metrics.activation(
            activation.application,
            activation.product,
            protocol,
            activation.count,
            request.required_count,
            request.workstation,
            self.peer,
            now,
        )
        journal = server.journal
        if rule is None:
            # journal.record_of's layout, built here: this is the path of every activation
            entry = journal.add(
                [
                    now,
                    self.peer,
                    call.call_id,
                    call.ndr64,
                    request,
                    COUNT,
                    activation.count,
                    None,
                    None,
                    None,
                ]
            )
            store = server.store
            self._send(call.reply(payload), store.barrier() if store else None, started, entry)
            return
        entry = self._journal(call, request, COUNT, activation.count, rule)
        tamper = rule.response.tamper
        if tamper == "rpc_call_id":
            # Not the request's call_id, nor the 1 that clients forgive (a Wine bug).
            wrong = call.call_id ^ 0x80000000
            reply = Call(wrong, call.context_id, call.ndr64, b"").reply(payload)
        elif tamper == "ndr_referent":
            reply = call.reply_error(0)  # a NULL response with success: no answer at all
        else:
            reply = call.reply(payload)
        self._reply(reply, started, entry, rule)

    def _act(self, call: Call, rule: Rule, base: BaseRequest, now: float, started: float) -> bool:
        """Answer a call as an action rule says (HRESULT, fault, close); False for a rule
        whose answer is a reply."""
        response = rule.response
        metrics = self.server.metrics
        if response.hresult is not None:
            log.warning(
                "request refused",
                client=self.peer,
                rule=rule.name,
                hresult=f"0x{response.hresult:08X}",
            )
            metrics.refusal(response.hresult, call.version, self.peer, now)
            entry = self._journal(call, base, HRESULT, response.hresult, rule)
            self._reply(call.reply_error(response.hresult), started, entry, rule, counted=False)
        elif response.fault is not None:
            log.warning(
                "call refused", client=self.peer, rule=rule.name, fault=f"0x{response.fault:08X}"
            )
            fault = Fault(call.call_id, call.context_id, response.fault)
            metrics.bad_input(fault)
            entry = self._journal(call, base, FAULT, response.fault, rule)
            self._reply(fault.encode(), started, entry, rule, counted=False)
        elif response.close:
            log.warning("closing connection", client=self.peer, rule=rule.name, reason="rule")
            metrics.error("close")
            self._journal(call, base, CLOSE, 0, rule)
            if response.delay:
                asyncio.get_running_loop().call_later(response.delay, self.close_when_flushed)
                self.closing = True
            else:
                self.close_when_flushed()
        else:
            return False
        return True

    def _journal(
        self,
        call: Call,
        base: BaseRequest | None,
        answer: str,
        value: int,
        rule: Rule | None,
        reason: str | None = None,
    ) -> Record:
        entry = record_of(
            self.server.clock(),
            self.peer,
            call.call_id,
            call.ndr64,
            base,
            answer,
            value,
            None if rule is None else rule.name,
            reason,
        )
        return self.server.journal.add(entry)

    def _reply(
        self,
        reply: bytes,
        started: float,
        entry: Record,
        rule: Rule | None,
        *,
        counted: bool = True,
    ) -> None:
        """Send a reply that waits for the store when it `counted` a client, and for the
        rule's delay."""
        store = self.server.store
        committed = store.barrier() if counted and store is not None else None
        if rule is not None and rule.response.delay:
            committed = _after(rule.response.delay, committed)
        self._send(reply, committed, started, entry)

    def _refuse_bind(self, data: bytes) -> bool:
        """Refuse the connection's first PDU with a bind_nak if a rule says so."""
        server = self.server
        now = server.clock()
        rule = server.rules.match_bind(self.address, now)
        if rule is None or rule.response.bind_nak is None:
            return False
        call_id = int.from_bytes(data[12:16], "little") if len(data) >= 16 else 0
        reason = rule.response.bind_nak
        log.warning("bind refused", client=self.peer, rule=rule.name, reason=reason)
        nak = BindNak(call_id, reason)
        server.metrics.bad_input(nak)
        server.journal.add(
            record_of(now, self.peer, call_id, False, None, BIND_NAK, reason, rule.name)
        )
        self._send(nak.encode(), None)
        self.close_when_flushed()
        return True

    def pause_writing(self) -> None:
        # A client that sends without reading: stop reading until it catches up.
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def evict(self) -> None:
        """Close at once: admission gave this connection's slot to a new one."""
        log.warning(
            "closing connection",
            client=self.peer,
            reason=f"{self.server.settings.max_connections} connections open: "
            "made room for a new one",
        )
        self.server.metrics.evicted += 1
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn.close()
            admission = self.server.admission
            admission.release(self.source, self)
            if not admission.open and self.server.all_closed is not None:
                self.server.all_closed.set()
            if logs.debug_enabled:
                log.debug("connection closed", client=self.peer)
