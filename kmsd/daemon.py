"""The KMS host as a running process: the store, the host, the server, the admin endpoint
and DNS publication, from one Settings, until SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from . import __version__, config, logs, privileges, reload, systemd
from .addresses import join_host_port
from .build import build
from .cache import RECORD_LIFETIME
from .clock import FileClock, ShiftedClock
from .dns.targets import Publications
from .eventloop import run_on_loop, uvloop_installed
from .host import HostIdentity, KmsHost
from .journal import Journal
from .protocol import crypto
from .protocol.products import products
from .server import KmsServer
from .store import MEMORY, SqliteStore, StoreError

if TYPE_CHECKING:
    from . import web

log = structlog.get_logger("kmsd")


def open_store(settings: config.Settings) -> SqliteStore:
    return SqliteStore(settings.table, known=frozenset(products().applications))


def make_host(settings: config.HostSettings, store: SqliteStore) -> KmsHost:
    """The host with its identity from the store (generated and saved on first start)."""
    db = products()
    stored_hwid, epids = store.load_identity()
    hwid = stored_hwid or settings.hwid or os.urandom(8)
    identity = HostIdentity(hwid=hwid, epids=epids)
    if identity.complete(db, os.urandom, time.time()) or stored_hwid is None:
        store.save_identity(hwid, identity.epids)
    identity.hwid = settings.hwid or hwid
    identity.overrides = dict(settings.epids)
    store.save_override(settings.policy.fixed_count, settings.policy.precharge)
    return KmsHost(store, identity, settings.policy, database=db)


def make_clock(settings: config.Settings) -> Callable[[], float]:
    """The clock file's time; else real time, which the admin endpoint may shift when its
    changes are enabled (kmsd as a test double, /api/clock)."""
    if settings.host.clock_file:
        return FileClock(settings.host.clock_file)
    return ShiftedClock() if settings.admin_token else time.time


def log_overrides(settings: config.Settings) -> None:
    policy, table = settings.host.policy, settings.table
    overrides = {
        "fixed_count": policy.fixed_count,
        "precharge": policy.precharge or None,
        "capacity": table.capacity,
        "record_lifetime_days": None
        if table.lifetime == RECORD_LIFETIME
        else table.lifetime / config.DAY,
    }
    for name, value in overrides.items():
        if value is not None:
            log.warning("lab override: not how a real KMS host counts", override=name, value=value)
    if settings.host.clock_file:
        path = str(settings.host.clock_file)
        log.warning("time read from a file: for tests and simulations only", path=path)


async def serve(
    settings: config.Settings,
    *,
    effective: config.Effective | None = None,
    cli: Mapping[str, Any] | None = None,
    sockets: Sequence[socket.socket] = (),
) -> None:
    """Serve until SIGTERM. `cli` and `effective`: what SIGHUP reloads from; `sockets`:
    listening sockets from systemd, served instead of settings.network.listen."""
    store = open_store(settings)
    user = settings.process.user
    try:
        host = make_host(settings.host, store)
        store.start(asyncio.get_running_loop())
        server = KmsServer(
            host,
            settings.network,
            clock=make_clock(settings),
            store=store,
            journal=Journal(settings.host.journal_size),
        )
        server.rules.configure(settings.host.rules, server.clock())
        await server.start(sockets, serving=user is None)
        if user is not None:  # bound and open as root; serve as the user
            path = settings.table.path
            privileges.drop_to(user, None if path == MEMORY else path)
            store.check_access()
            await server.start_serving()
    except BaseException:
        await store.close()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log_overrides(settings)
    endpoint = await _start_admin(settings, server, store)
    publications = Publications(server.addresses)  # its failures never stop kmsd
    publications.apply(settings.dns)
    if endpoint is not None:
        endpoint.watch_dns(publications)
    reloader = None
    if effective is not None:
        reloader = reload.Reloader(
            cli or {}, effective, settings, host, publications, server=server, store=store
        )
        loop.add_signal_handler(signal.SIGHUP, reloader.request)
    if not crypto.ACCELERATED_AVAILABLE:
        log.warning(
            "the compiled Rijndael is not built: V4 and V6 requests cost 18-31 times the CPU "
            "in pure Python; install gcc and python3-dev, then install kmsd again",
        )
    log.info(
        "kmsd ready",
        version=__version__,
        build=build(),
        database=settings.table.path,
        hwid=host.identity.hwid.hex().upper(),
        strict=host.policy.strict,
        crypto="compiled" if crypto.ACCELERATED else "pure-python",
    )
    listening = ", ".join(join_host_port(h, p) for h, p in server.addresses)
    systemd.notify(f"READY=1\nSTATUS=serving on {listening}")
    watchdog = systemd.start_watchdog()
    await stop.wait()
    systemd.notify("STOPPING=1\nSTATUS=stopping")
    log.info("stopping", connections=len(server.connections))
    if reloader is not None:
        await reloader.stop()
    if endpoint is not None:
        await endpoint.stop()
    await publications.stop()  # clients stop being sent here before the host goes
    await server.stop()
    await store.close()
    await server.drained()
    if watchdog is not None:
        watchdog.cancel()
    logs.flush_suppressed()
    log.info("stopped")


async def _start_admin(
    settings: config.Settings, server: KmsServer, store: SqliteStore
) -> web.AdminServer | None:
    """The admin endpoint when --admin is set; kmsd does not start without it then."""
    if settings.admin is None:
        return None
    from . import web

    try:
        return await web.start(settings.admin, server, store, token=settings.admin_token)
    except OSError:
        await server.stop()
        await store.close()
        raise


def run(settings: config.Settings, effective: config.Effective, cli: Mapping[str, Any]) -> int:
    """Run the daemon in this process; the exit status."""
    try:
        inherited = systemd.listen_sockets()
    except systemd.ActivationError as exc:
        log.error("cannot start", error=str(exc))
        return 1
    loop = settings.process.loop
    if loop == "uvloop" and not uvloop_installed():
        log.error("cannot start", error="--loop uvloop: uvloop is not installed")
        return 1
    try:
        run_on_loop(serve(settings, effective=effective, cli=cli, sockets=inherited), loop)
    except (OSError, StoreError, privileges.PrivilegeError) as exc:
        log.error("cannot start", error=str(exc))
        systemd.notify(f"STATUS=cannot start: {exc}")
        return 1
    # Stopped cleanly; the closed loop gave SIGTERM back its default action, and a second
    # SIGTERM while the interpreter exits must not turn that into death by signal.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return 0
