"""A real kmsd host inside a test process, steered from the test.

    with KmsTestHost() as host:
        host.rule(product="Windows 10/11 Enterprise", hresult="KMS_ID_MISMATCH", times=1)
        run_the_tool_under_test(host.target)           # "127.0.0.1:PORT"
        assert host.journal[-1].hresult == 0xC004F042
        host.clock.advance(days=31)

The host is the daemon's own server (kmsd.server) on 127.0.0.1 with an ephemeral port, a
`:memory:` store and a virtual clock: what the tool sees on the wire is what a deployed
kmsd sends. Used as a context manager (or start()/stop()) it runs on its own event loop in
a thread, so blocking code and subprocesses can talk to it; `async with` runs it on the
caller's loop instead. The pytest fixtures built on it are in kmsd.pytest_plugin.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from .clock import VirtualClock
from .config import defaults
from .host import HostIdentity, HostPolicy, KmsHost
from .journal import DEFAULT_SIZE, Entry, Filter, Journal
from .protocol.products import products
from .rules import Rule, RuleSet, parse_rule
from .server import KmsServer
from .store import MEMORY, SqliteStore

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 10.0  # seconds for the host to start or stop on its thread
T = TypeVar("T")


class LoopThread:
    """An event loop running in a thread of its own, for the blocking side of a test."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(ready.set)
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()
        ready.wait(START_TIMEOUT)

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run `work` on the loop and wait for its result."""
        future = asyncio.run_coroutine_threadsafe(work, self.loop)
        try:
            return future.result(START_TIMEOUT)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def call(self, work: Callable[[], T]) -> T:
        """Call `work` on the loop's thread and wait for its result."""

        async def call() -> T:
            return work()

        return self.run(call())

    @classmethod
    def serving(cls, name: str, start: Callable[[], Coroutine[Any, Any, object]]) -> LoopThread:
        """A new loop thread on which `start()` has run (or, if it failed, none)."""
        thread = cls(name)
        try:
            thread.run(start())
        except BaseException:
            thread.close()
            raise
        return thread

    def finish(self, stop: Coroutine[Any, Any, object]) -> None:
        """Run `stop` on the loop, then close it."""
        try:
            self.run(stop)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the loop (after its executor's threads) and end the thread."""
        with contextlib.suppress(RuntimeError, concurrent.futures.TimeoutError):
            self.run(self.loop.shutdown_default_executor())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(START_TIMEOUT)
        self.loop.close()


class KmsTestHost:
    """kmsd serving on 127.0.0.1:<ephemeral>, for one test or a session of them."""

    def __init__(
        self,
        policy: HostPolicy = HostPolicy(),
        *,
        journal_size: int = DEFAULT_SIZE,
        hwid: bytes | None = None,
    ) -> None:
        self.policy = policy
        self.settings = defaults()  # kmsd's defaults, as a daemon without options has them
        self.clock = VirtualClock()
        self.rules = RuleSet()
        self.journal_ring = Journal(journal_size)
        self.hwid = hwid or os.urandom(8)
        self.server: KmsServer | None = None
        self.store: SqliteStore | None = None
        self._thread: LoopThread | None = None

    # Starting and stopping ------------------------------------------------------------

    def start(self) -> Self:
        """Serve on a new event loop in a thread of its own."""
        if self._running:
            raise RuntimeError("this KmsTestHost is already running")
        self._thread = LoopThread.serving("kmsd-test-host", self._serve)
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.finish(self._shutdown())

    async def start_async(self) -> Self:
        """Serve on the running event loop (for async tests)."""
        if self._running:
            raise RuntimeError("this KmsTestHost is already running")
        await self._serve()
        return self

    async def stop_async(self) -> None:
        await self._shutdown()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await self.start_async()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop_async()

    async def _serve(self) -> None:
        store = self._new_store()
        identity = HostIdentity(hwid=self.hwid)
        identity.complete(products(), os.urandom, self.clock())
        host = KmsHost(store, identity, self.policy)
        server = KmsServer(
            host,
            dataclasses.replace(self.settings.network, listen=((LOOPBACK, 0),)),
            clock=self.clock,
            store=store,
            rules=self.rules,
            journal=self.journal_ring,
        )
        try:
            await server.start()
        except BaseException:
            await store.close()
            raise
        self.server, self.store = server, store

    def _new_store(self) -> SqliteStore:
        table = dataclasses.replace(self.settings.table, path=MEMORY)
        store = SqliteStore(table, known=frozenset(products().applications))
        store.start(asyncio.get_running_loop())
        return store

    async def _shutdown(self) -> None:
        server, store = self.server, self.store
        self.server = self.store = None
        if server is not None:
            await server.stop()
            await server.drained()
        if store is not None:
            await store.close()

    @property
    def _running(self) -> bool:
        return self.server is not None or self._thread is not None

    def _on_loop(self, work: Callable[[], T]) -> T:
        """Call `work` where the host's state lives: on its loop's thread."""
        if self._thread is None:
            return work()  # not started, or on the caller's loop (async use)
        return self._thread.call(work)

    # What tests use -------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the host listens on."""
        if self.server is None:
            raise RuntimeError("the KmsTestHost is not running")
        return self.server.addresses[0]

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def target(self) -> str:
        """HOST:PORT, as kmsclient and most tools take it."""
        return f"{LOOPBACK}:{self.port}"

    def rule(self, **spec: Any) -> Rule:
        """Add a behaviour rule (keys: kmsd.rules); it applies from the next request on."""
        rule = parse_rule(spec)
        return self._on_loop(lambda: self.rules.add(rule, self.clock()))

    def remove_rule(self, rule: Rule | int) -> bool:
        rule_id = rule if isinstance(rule, int) else rule.id
        return self._on_loop(lambda: self.rules.remove(rule_id))

    def current_rules(self) -> list[Rule]:
        return self._on_loop(lambda: list(self.rules.current(self.clock())))

    @property
    def journal(self) -> list[Entry]:
        """The exchanges so far, oldest first."""
        return self._on_loop(self.journal_ring.entries)

    def select(self, where: Filter | None = None) -> list[Entry]:
        """The journal's entries that `where` keeps (all by default)."""
        return self._on_loop(lambda: self.journal_ring.entries(where))

    @property
    def counts(self) -> dict[str, int]:
        """The count each application's table holds now (by application name)."""

        def read() -> dict[str, int]:
            if self.store is None:
                return {}
            now = self.clock()
            apps = products().applications
            return {
                (apps[app].name if app in apps else str(app)): table.count(now)
                for app, table in self.store.counter.snapshot().items()
            }

        return self._on_loop(read)

    def reset(self) -> None:
        """Back to a fresh host: no rules, an empty journal and client table, real time."""
        if self._thread is None:
            raise RuntimeError("reset() of an async KmsTestHost: use await reset_async()")
        self._thread.run(self.reset_async())

    async def reset_async(self) -> None:
        """reset(), on the caller's loop."""
        self.rules.clear()
        self.journal_ring.clear()
        self.clock.set(time.time())
        server, old = self.server, self.store
        if server is not None and old is not None:
            store = self._new_store()
            server.host.counter = server.store = self.store = store
            await old.close()


class KmsDns:
    """kmsd's own DNS responder (kmsd.dns.responder) on 127.0.0.1, advertising test hosts
    as `_vlmcs._tcp.<zone>` SRV records, for tools that discover their KMS host.

    Hosts get priorities 0, 10, 20... in the order given (clients try the first one first),
    unless `priorities` says otherwise. Point the tool at `nameserver` with `zone` as its
    DNS domain (kmsclient: --nameserver NAMESERVER --domain ZONE)."""

    def __init__(
        self,
        hosts: Sequence[KmsTestHost],
        zone: str = "kms.test",
        priorities: Sequence[int] | None = None,
    ) -> None:
        from .dns.responder import KmsEntry, Zone

        priorities = priorities or [10 * i for i in range(len(hosts))]
        entries = [
            KmsEntry(f"kms{i + 1}", (LOOPBACK,), host.port, priority)
            for i, (host, priority) in enumerate(zip(hosts, priorities, strict=True))
        ]
        self.zone = zone
        self._zone = Zone(zone, entries)
        self._thread: LoopThread | None = None
        self.address: tuple[str, int] | None = None

    @property
    def nameserver(self) -> str:
        """IP:PORT of the responder."""
        if self.address is None:
            raise RuntimeError("the KmsDns responder is not running")
        return f"{self.address[0]}:{self.address[1]}"

    def start(self) -> Self:
        from .dns.responder import Responder

        responder = self._responder = Responder(self._zone)
        self._thread = LoopThread.serving("kmsd-test-dns", lambda: responder.start([(LOOPBACK, 0)]))
        self.address = responder.addresses[0]
        return self

    def stop(self) -> None:
        thread, self._thread, self.address = self._thread, None, None
        if thread is not None:
            thread.finish(self._responder.stop())

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
