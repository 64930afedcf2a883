"""The admin endpoint (`--admin 127.0.0.1:9688`): Prometheus metrics, health and readiness
probes, a JSON API and a status page, over a minimal HTTP/1.1 server on the daemon's loop.

GET and HEAD, one request per connection (Connection: close), request heads of at most
MAX_HEAD bytes arriving within REQUEST_TIMEOUT seconds, at most MAX_CLIENTS at once: when all
are taken, the connection that has waited longest for its request head is closed for the
newcomer, so idle connections cannot keep health probes out. Reading needs no
authentication: keep it on loopback or a management network. The test double's changes
(POST and DELETE on /api/rules and /api/clock, kmsd.control) are refused unless kmsd was
given a token (--admin-token-file), which each of them must carry (Authorization: Bearer).

/api/clients and /api/stats are what `kmsd clients --json` and `kmsd stats --json` print:
the same reads of kmsd.store on the committed database, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import time
from base64 import b64encode
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import structlog

from . import __version__, control
from .addresses import is_ip, join_host_port
from .cache import MemoryCounter
from .control import Problem
from .metrics import UNKNOWN
from .server import KmsServer
from .store import AppStats, SqliteStore, StoreError, app_name, as_reported, resolve_app

log = structlog.get_logger("kmsd")

MAX_HEAD = 8192  # bytes of request line and headers
MAX_BODY = 65536  # bytes of a POST body (rules)
REQUEST_TIMEOUT = 2.0  # seconds for the request head to arrive (a probe sends it at once)
MAX_CLIENTS = 32  # admin connections at once; beyond, an idle one gives way, or else 503
HEARTBEAT = 1.0  # seconds between event loop lag measurements
JSON = "application/json"
METRICS = "text/plain; version=0.0.4; charset=utf-8"
HTML = "text/html; charset=utf-8"

REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class Response:
    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes | str,
        content_type: str = JSON,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = body.encode() if isinstance(body, str) else body
        self.content_type = content_type
        self.headers = headers or {}

    def encode(self, head_only: bool = False) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status} {REASONS.get(self.status, '')}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Connection: close",
            "Cache-Control: no-store",
            "X-Content-Type-Options: nosniff",
            *(f"{k}: {v}" for k, v in self.headers.items()),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        return head if head_only else head + self.body


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(status, json.dumps({"error": message}) + "\n", JSON, headers)


def _json(value: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(value, indent=1) + "\n")


def _page() -> tuple[bytes, str]:
    """The status page, and its Content-Security-Policy (its inline script and style by
    hash: nothing else runs, nothing is loaded from elsewhere)."""
    page = Path(__file__).with_name("status.html").read_bytes()
    hashes = {}
    for tag in ("script", "style"):
        start = page.index(f"<{tag}>".encode()) + len(tag) + 2
        end = page.index(f"</{tag}>".encode(), start)
        hashes[tag] = b64encode(hashlib.sha256(page[start:end]).digest()).decode()
    policy = (
        "default-src 'none'; connect-src 'self'; img-src 'self'; "
        f"script-src 'sha256-{hashes['script']}'; style-src 'sha256-{hashes['style']}'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return page, policy


class DnsPublication(Protocol):
    """What the endpoint needs of DNS publication (kmsd.dns.publish.Publisher, or
    kmsd.dns.targets.Publications for several zones)."""

    def state(self) -> Mapping[str, Any] | None: ...


class AdminServer:
    """Serves the admin endpoint of one KmsServer (and its store and DNS publisher)."""

    def __init__(
        self,
        kms: KmsServer,
        store: SqliteStore | None = None,
        publisher: DnsPublication | None = None,
        token: str | None = None,
    ) -> None:
        """`token`: the bearer token the changing requests (POST, DELETE) must carry;
        None: they are refused."""
        self.kms = kms
        self.token = token
        self.store = store
        self.publisher = publisher
        self.metrics = kms.metrics
        if store is not None:
            self.metrics.commit_failures = lambda: store.failures
        self.watch_dns(publisher)
        self.page, self.policy = _page()
        self.address: tuple[str, int] | None = None
        self.loop_lag = 0.0
        self._server: asyncio.Server | None = None
        self._beat: asyncio.TimerHandle | None = None
        # Connections being served, oldest first, and those of them being answered (the
        # others wait for their request head, and may give way to a newcomer).
        self._clients: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._answering: set[asyncio.Task[None]] = set()
        self.routes: dict[str, Callable[[dict[str, list[str]]], Any]] = {
            "/": self.status_page,
            "/metrics": self.metrics_text,
            "/healthz": self.healthz,
            "/readyz": self.readyz,
            "/api/clients": self.api_clients,
            "/api/stats": self.api_stats,
            "/api/status": self.api_status,
            "/api/rules": self.api_rules,
            "/api/journal": self.api_journal,
            "/api/clock": self.api_clock,
        }
        # Paths that change something, by method: only with the token.
        self.changes: dict[tuple[str, str], Callable[[dict[str, list[str]], bytes], Any]] = {
            ("POST", "/api/rules"): self.add_rules,
            ("DELETE", "/api/rules"): self.delete_rules,
            ("POST", "/api/clock"): self.set_clock,
        }

    def watch_dns(self, publisher: DnsPublication | None) -> None:
        """Report this DNS publisher's state (None: publication is off)."""
        self.publisher = publisher
        if publisher is not None:
            self.metrics.dns_state = publisher.state

    async def start(self, host: str, port: int) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD)
        except OSError as exc:
            where = join_host_port(host, port)
            raise OSError(
                exc.errno, f"admin endpoint: cannot listen on {where}: {exc.strerror}"
            ) from None
        sock = self._server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        loop = asyncio.get_running_loop()
        self._beat = loop.call_later(HEARTBEAT, self._heartbeat, loop.time() + HEARTBEAT)
        where = join_host_port(sock[0], sock[1])
        log.info("admin endpoint", address=where, url=f"http://{where}/")

    async def stop(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
        if self._server is not None:
            self._server.close()
            for writer in self._clients.values():
                writer.transport.abort()  # their tasks end as on any lost connection
            await self._server.wait_closed()
            self._server = None

    def _heartbeat(self, due: float) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.loop_lag = max(0.0, now - due)
        self._beat = loop.call_later(HEARTBEAT, self._heartbeat, now + HEARTBEAT)

    # HTTP ---------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            if len(self._clients) >= MAX_CLIENTS and not self._make_room():
                response, head_only = error(503, "too many admin requests at once"), False
            else:
                self._clients[task] = writer
                response, head_only = await self._respond(reader, task)
            if writer.transport.is_closing():
                return  # it gave way to a newcomer, or kmsd stops (uvloop raises on a write)
            writer.write(response.encode(head_only))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            self._clients.pop(task, None)
            self._answering.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), REQUEST_TIMEOUT)

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for its request head, if any (its
        task ends as on any lost connection)."""
        for task, writer in self._clients.items():
            if task not in self._answering:
                del self._clients[task]
                writer.transport.abort()
                return True
        return False

    async def _respond(
        self, reader: asyncio.StreamReader, task: asyncio.Task[None]
    ) -> tuple[Response, bool]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
        except asyncio.LimitOverrunError:
            return error(431, f"request head larger than {MAX_HEAD} bytes"), False
        except asyncio.IncompleteReadError as exc:
            if len(exc.partial) >= MAX_HEAD:
                return error(431, f"request head larger than {MAX_HEAD} bytes"), False
            return error(400, "incomplete request"), False
        except TimeoutError:
            return error(408, f"no complete request within {REQUEST_TIMEOUT:g} s"), False
        self._answering.add(task)  # it no longer gives way
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        if len(parts) != 3 or not parts[1].startswith("/"):
            return error(400, "malformed request line"), False
        method, target, version = parts
        if not version.startswith("HTTP/1."):
            return error(505, "HTTP/1.x only"), False
        head_only = method == "HEAD"
        if method not in ("GET", "HEAD", "POST", "DELETE"):
            return error(405, f"{method} not allowed", {"Allow": "GET, HEAD"}), False
        if not self._host_allowed(head):
            return error(
                421,
                "on a loopback address the admin endpoint answers only to "
                "localhost or an IP address (DNS rebinding protection)",
            ), head_only
        url = urlsplit(target)
        if method in ("POST", "DELETE"):
            return await self._change(method, url.path, parse_qs(url.query), head, reader), False
        handler = self.routes.get(url.path)
        if handler is None:
            return error(404, f"no such page: {url.path}"), head_only
        try:
            response: Response = await handler(parse_qs(url.query))
        except Exception:
            log.exception("admin endpoint: internal error", path=url.path)
            response = error(500, "internal error (logged)")
        return response, head_only

    async def _change(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        head: bytes,
        reader: asyncio.StreamReader,
    ) -> Response:
        """A POST or DELETE: only with the token, and a body of at most MAX_BODY bytes."""
        handler = self.changes.get((method, path))
        if handler is None:
            allowed = ", ".join(["GET", "HEAD"] + [m for m, p in self.changes if p == path])
            return error(405, f"{method} not allowed on {path}", {"Allow": allowed})
        if self.token is None:
            return error(
                403,
                "changes over the admin endpoint are off (kmsd --admin-token-file enables them)",
            )
        given = _header(head, "authorization") or ""
        scheme, _, credentials = given.partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            return error(
                401, "a bearer token is needed", {"WWW-Authenticate": 'Bearer realm="kmsd"'}
            )
        if not hmac.compare_digest(credentials.strip().encode(), self.token.encode()):
            log.warning("admin endpoint: wrong token", path=path, method=method)
            return error(403, "wrong token")
        length_text = _header(head, "content-length")
        if length_text is None and method == "POST":
            return error(411, "a POST needs a Content-Length")
        length = int(length_text) if length_text and length_text.isdigit() else 0
        if length > MAX_BODY:
            return error(413, f"bodies of at most {MAX_BODY} bytes")
        try:
            body = await asyncio.wait_for(reader.readexactly(length), REQUEST_TIMEOUT)
        except (asyncio.IncompleteReadError, TimeoutError):
            return error(400, f"a body of {length} bytes did not arrive")
        try:
            value = handler(query, body)
        except Problem as exc:
            return error(exc.status, exc.message)
        log.info("admin endpoint: changed", method=method, path=path)
        return _json(value, 201 if (method, path) == ("POST", "/api/rules") else 200)

    def _host_allowed(self, head: bytes) -> bool:
        """Bound to loopback, the endpoint refuses requests naming another host: a web page
        could otherwise point its own DNS name at 127.0.0.1 and read the API (rebinding)."""
        if self.address is None or not ipaddress.ip_address(self.address[0]).is_loopback:
            return True
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "host":
                host = value.strip()
                host = host[1 : host.find("]")] if host.startswith("[") else host.split(":")[0]
                return host.lower() == "localhost" or is_ip(host)
        return True  # HTTP/1.0 without Host: not a browser

    # The test double (kmsd.control) ---------------------------------------------------

    async def api_rules(self, _: dict[str, list[str]]) -> Response:
        return _json([r.describe() for r in self.kms.rules.current(self.kms.clock())])

    async def api_journal(self, query: dict[str, list[str]]) -> Response:
        try:
            return _json(control.read_journal(self.kms.journal, query))
        except Problem as exc:
            return error(exc.status, exc.message)

    async def api_clock(self, _: dict[str, list[str]]) -> Response:
        return _json(control.read_clock(self.kms.clock))

    def add_rules(self, _: dict[str, list[str]], body: bytes) -> Any:
        return control.add_rules(self.kms.rules, body, self.kms.clock())

    def delete_rules(self, query: dict[str, list[str]], _: bytes) -> Any:
        return control.delete_rules(self.kms.rules, query)

    def set_clock(self, _: dict[str, list[str]], body: bytes) -> Any:
        return control.set_clock(self.kms.clock, body)

    # Pages ----------------------------------------------------------------------------

    async def status_page(self, _: dict[str, list[str]]) -> Response:
        return Response(200, self.page, HTML, {"Content-Security-Policy": self.policy})

    async def metrics_text(self, _: dict[str, list[str]]) -> Response:
        policy = self.kms.host.policy
        text = self.metrics.render(
            open_connections=len(self.kms.connections),
            tables=self.tables(),
            ready=self.ready()[0],
            loop_lag=self.loop_lag,
            reported=policy.reported,
            override=(policy.precharge, policy.fixed_count),
        )
        return Response(200, text, METRICS)

    async def healthz(self, _: dict[str, list[str]]) -> Response:
        """Alive, and its event loop answers (this reply comes from it)."""
        return _json({"status": "ok", "loop_lag_seconds": round(self.loop_lag, 6)})

    async def readyz(self, _: dict[str, list[str]]) -> Response:
        ready, checks = self.ready()
        return _json({"ready": ready, "checks": checks}, 200 if ready else 503)

    def ready(self) -> tuple[bool, dict[str, bool]]:
        checks = {"listening": self.kms.serving}
        if self.store is not None:
            checks.update(self.store.checks())
        return all(checks.values()), checks

    async def api_clients(self, query: dict[str, list[str]]) -> Response:
        app = None
        if "app" in query:
            try:
                app = resolve_app(query["app"][0])
            except StoreError as exc:
                return error(400, str(exc))
        now = self.kms.clock()
        return await self._api(lambda store: store.clients(now, app))

    async def api_stats(self, _: dict[str, list[str]]) -> Response:
        """`kmsd stats --json`: the count clients are told (lab overrides applied)."""
        now = self.kms.clock()
        policy = self.kms.host.policy

        async def read(store: SqliteStore) -> list[AppStats]:
            return as_reported(await store.stats(now), policy.reported, policy.override)

        return await self._api(read)

    async def api_status(self, _: dict[str, list[str]]) -> Response:
        """What the status page shows beside the table: health, connections, recent
        activations (newest first), DNS publication."""
        ready, checks = self.ready()
        return _json(
            {
                "version": __version__,
                "uptime_seconds": round(time.time() - self.metrics.started, 3),
                "ready": ready,
                "checks": checks,
                "connections_open": len(self.kms.connections),
                "connections_accepted": self.metrics.accepted,
                "dns": self.metrics.dns_state(),
                "recent": self.metrics.recent_activations(),
            }
        )

    # Reading the table ----------------------------------------------------------------

    def working_copy(self) -> MemoryCounter | None:
        counter = self.kms.host.counter
        if isinstance(counter, SqliteStore):
            return counter.counter
        return counter if isinstance(counter, MemoryCounter) else None

    def tables(self) -> list[tuple[str, int, int]]:
        """(application, count, capacity) from the working copy; applications not in the
        product database are summed as one."""
        counter = self.working_copy()
        if counter is None:
            return []
        now = self.kms.clock()
        out: dict[str, list[int]] = {}
        for app, table in counter.snapshot().items():
            name = app_name(str(app))
            if name == str(app):
                name = UNKNOWN
            row = out.setdefault(name, [0, 0])
            row[0] += table.count(now)
            row[1] += table.capacity
        return [(name, count, capacity) for name, (count, capacity) in out.items()]

    async def _api(self, read: Callable[[SqliteStore], Awaitable[list[Any]]]) -> Response:
        if self.store is None:
            return error(503, "no database: kmsd counts in memory only")
        try:
            rows = await read(self.store)
        except StoreError as exc:
            return error(503, str(exc))
        return _json([asdict(r) for r in rows])


def _header(head: bytes, wanted: str) -> str | None:
    """The value of a header of the request head (the last one of that name)."""
    value = None
    for line in head.split(b"\r\n")[1:]:
        name, _, text = line.decode("latin-1").partition(":")
        if name.strip().lower() == wanted:
            value = text.strip()
    return value


async def start(
    listen: tuple[str, int],
    kms: KmsServer,
    store: SqliteStore | None = None,
    publisher: DnsPublication | None = None,
    token: str | None = None,
) -> AdminServer:
    admin = AdminServer(kms, store, publisher, token)
    await admin.start(*listen)
    return admin
