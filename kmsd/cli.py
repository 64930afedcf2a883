"""`kmsd` command line: run the KMS host."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from . import __version__, config, logs, privileges, reload, systemd, tablecmd
from .addresses import join_host_port
from .clock import FileClock
from .eventloop import run_on_loop, uvloop_installed
from .host import HostIdentity, KmsHost
from .pipe import quiet_on_broken_pipe
from .protocol.products import products
from .server import KmsServer, ServerSettings
from .store import MEMORY, SqliteStore, StoreError

if TYPE_CHECKING:
    from . import web
    from .dns.publish import Publisher

log = structlog.get_logger("kmsd")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kmsd",
        description="A KMS (Windows Key Management Service) host emulator for labs and tests. "
        "Answers activation requests of protocol V4, V5 and V6 over DCE-RPC on TCP port 1688, "
        "counting clients as a real KMS host does (25 for Windows clients, 5 for servers "
        "and Office). Every option can also be set in the configuration file or as the "
        "environment variable in brackets; the command line wins, then the environment, "
        "then the file.",
        epilog="Other commands: kmsd check-config (print the effective configuration); on the "
        "database, safe while kmsd runs: kmsd clients, kmsd stats, kmsd forget CLIENT_ID, "
        "kmsd reset [--app NAME]; a lab DNS responder advertising KMS hosts: kmsd dns-serve "
        "ZONE --kms IP[:PORT]; each has --help.",
    )
    p.add_argument("--version", action="version", version=f"kmsd {__version__}")
    config.add_options(p)
    return p


def open_store(args: argparse.Namespace) -> SqliteStore:
    db = products()
    return SqliteStore(
        args.db,
        known=frozenset(db.applications),
        lifetime=args.record_lifetime * 86400,
        fixed_capacity=args.capacity,
        synchronous=args.synchronous,
        history=args.history_days * 86400 if args.history_days else None,
    )


def make_host(args: argparse.Namespace, store: SqliteStore) -> KmsHost:
    """The host with its identity from the store (generated and saved on first start)."""
    db = products()
    stored_hwid, epids = store.load_identity()
    hwid = stored_hwid or args.hwid or os.urandom(8)
    identity = HostIdentity(hwid=hwid, epids=epids)
    if identity.complete(db, os.urandom, time.time()) or stored_hwid is None:
        store.save_identity(hwid, identity.epids)
    identity.hwid = args.hwid or hwid
    identity.overrides = dict(args.epid)
    return KmsHost(store, identity, reload.host_policy(args), database=db)


def log_overrides(args: argparse.Namespace) -> None:
    overrides = {
        "fixed_count": args.fixed_count,
        "precharge": args.precharge or None,
        "capacity": args.capacity,
        "record_lifetime_days": None if args.record_lifetime == 30 else args.record_lifetime,
    }
    for name, value in overrides.items():
        if value is not None:
            log.warning("lab override: not how a real KMS host counts", override=name, value=value)
    if args.clock_file:
        log.warning("time read from a file: for tests and simulations only", path=args.clock_file)


async def serve(
    args: argparse.Namespace,
    settings: ServerSettings,
    *,
    cli: Mapping[str, Any] | None = None,
    effective: config.Effective | None = None,
    sockets: Sequence[socket.socket] = (),
) -> None:
    """Serve until SIGTERM. `cli` and `effective`: what SIGHUP reloads from; `sockets`:
    listening sockets from systemd, served instead of settings.listen."""
    store = open_store(args)
    try:
        host = make_host(args, store)
        store.start(asyncio.get_running_loop())
        clock = FileClock(Path(args.clock_file)) if args.clock_file else time.time
        server = KmsServer(host, settings, clock=clock, store=store)
        await server.start(sockets, serving=args.user is None)
        if args.user is not None:  # bound and open as root; serve as the user
            privileges.drop_to(args.user, None if args.db == MEMORY else args.db)
            await server.start_serving()
    except BaseException:
        await store.close()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log_overrides(args)
    endpoint = await _start_admin(args, server, store)
    publisher = _start_publishing(args, server.addresses)
    if endpoint is not None:
        endpoint.watch_dns(publisher)
    if effective is not None:
        reloader = reload.Reloader(cli or {}, effective, host, publisher)
        loop.add_signal_handler(signal.SIGHUP, reloader.reload)
    log.info(
        "kmsd ready",
        version=__version__,
        database=args.db,
        hwid=host.identity.hwid.hex().upper(),
        strict=host.policy.strict,
    )
    listening = ", ".join(join_host_port(h, p) for h, p in server.addresses)
    systemd.notify(f"READY=1\nSTATUS=serving on {listening}")
    watchdog = systemd.start_watchdog()
    await stop.wait()
    systemd.notify("STOPPING=1\nSTATUS=stopping")
    log.info("stopping", connections=len(server.connections))
    if endpoint is not None:
        await endpoint.stop()
    if publisher is not None:
        await publisher.stop()  # clients stop being sent here before the host goes
    await server.stop()
    await store.close()
    await server.drained()
    if watchdog is not None:
        watchdog.cancel()
    logs.flush_suppressed()
    log.info("stopped")


async def _start_admin(
    args: argparse.Namespace, server: KmsServer, store: SqliteStore
) -> web.AdminServer | None:
    """The admin endpoint when --admin is set; kmsd does not start without it then."""
    if args.admin is None:
        return None
    from . import web

    try:
        return await web.start(args.admin, server, store)
    except OSError:
        await server.stop()
        await store.close()
        raise


def _start_publishing(
    args: argparse.Namespace, addresses: Sequence[tuple[str, int]]
) -> Publisher | None:
    """SRV publication when [dns] publish_zone is set; its failures never stop kmsd."""
    if args.publish_zone is None:
        return None
    from .dns import publish  # dnspython is loaded only by a kmsd that publishes

    try:
        settings = publish.settings_from(args)
    except ValueError as exc:
        log.error("dns publication disabled", error=str(exc))
        return None
    assert settings is not None
    publisher = publish.Publisher(settings, addresses)
    publisher.start()
    return publisher


@quiet_on_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "dns-serve":
        from .dns import responder

        return responder.main(argv[1:])
    if argv and argv[0] in tablecmd.COMMANDS:
        return tablecmd.main(argv)
    check_only = bool(argv) and argv[0] == "check-config"
    parser = build_parser()
    try:
        given = vars(parser.parse_args(argv[1:] if check_only else argv))
        effective = config.resolve(given)
    except config.ConfigError as exc:
        print(f"kmsd: configuration error:\n{exc}", file=sys.stderr)
        return 2
    if check_only:
        print(config.render(effective), end="")
        return 0
    args = effective.namespace()
    logs.configure(args.log_format, args.log_level)
    try:
        inherited = systemd.listen_sockets()
    except systemd.ActivationError as exc:
        log.error("cannot start", error=str(exc))
        return 1
    listen = tuple(args.listen)
    if effective.sources["listen"] == "default" and not _ipv6_available():
        listen = listen[:1]
    settings = ServerSettings(
        listen=listen,
        idle_timeout=args.idle_timeout,
        read_timeout=args.read_timeout,
        max_connections=args.max_connections,
        max_connections_per_ip=args.max_connections_per_ip,
        allow=tuple(args.allow),
        rate_per_ip=args.rate_per_ip,
        max_pdu=args.max_pdu,
        ndr64=args.ndr64,
        btfn=args.btfn,
    )
    if args.loop == "uvloop" and not uvloop_installed():
        log.error("cannot start", error="--loop uvloop: uvloop is not installed")
        return 1
    try:
        run_on_loop(
            serve(args, settings, cli=given, effective=effective, sockets=inherited), args.loop
        )
    except (OSError, StoreError, privileges.PrivilegeError) as exc:
        log.error("cannot start", error=str(exc))
        systemd.notify(f"STATUS=cannot start: {exc}")
        return 1
    # Stopped cleanly; the closed loop gave SIGTERM back its default action, and a second
    # SIGTERM while the interpreter exits must not turn that into death by signal.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return 0


def _ipv6_available() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM):
            return True
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
