"""`kmsd` command line: run the KMS host."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Sequence
from uuid import UUID

import structlog

from . import __version__, admin, logs
from .cache import RECORD_LIFETIME
from .host import (
    DEFAULT_ACTIVATION_INTERVAL,
    DEFAULT_RENEWAL_INTERVAL,
    HostIdentity,
    HostPolicy,
    KmsHost,
)
from .protocol.epid import parse_epid
from .protocol.products import products
from .server import DEFAULT_PORT, KmsServer, ServerSettings
from .store import MEMORY, SqliteStore, StoreError, default_path

log = structlog.get_logger("kmsd")


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT, HOST (port 1688) or :PORT (all IPv4 addresses)."""
    host, port = text, str(DEFAULT_PORT)
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] not in ("", ":"):
            raise argparse.ArgumentTypeError(f"{text!r}: expected [IPv6]:PORT")
        host, rest = text[1:end], text[end + 2 :]
        port = rest or port
    elif text.count(":") == 1:
        host, port = text.split(":")
        host = host or "0.0.0.0"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: port must be 0-65535")
    return host, int(port)


def parse_hwid(text: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != 8:
        raise argparse.ArgumentTypeError(f"{text!r}: HWID must be 16 hex digits")
    return value


def parse_epid_override(text: str) -> tuple[UUID, str]:
    """KMS=EPID, where KMS is a KMS counted ID or the name of a KMS group or SKU."""
    kms, sep, epid = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KMS-ID-OR-NAME=EPID")
    try:
        parse_epid(epid)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    db = products()
    try:
        return UUID(kms), epid
    except ValueError:
        pass
    for item in db.kms_items.values():
        if item.name.casefold() == kms.casefold():
            return item.id, epid
    if (sku := db.sku_by_name(kms)) is not None:
        return sku.kms.id, epid
    raise argparse.ArgumentTypeError(f"{kms!r} is neither a GUID nor a known KMS group or SKU")


def positive(kind: type[int] | type[float]) -> argparse._ActionType:
    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
        return value

    return convert


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it says something (not for flags or unset options)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action.default, bool | list):
            return action.help or ""
        return super()._get_help_string(action) or ""


def non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kmsd",
        description="A KMS (Windows Key Management Service) host emulator for labs and tests. "
        "Answers activation requests of protocol V4, V5 and V6 over DCE-RPC on TCP port 1688, "
        "counting clients as a real KMS host does (25 for Windows clients, 5 for servers "
        "and Office).",
        formatter_class=_HelpFormatter,
        epilog="Admin commands on the same database (safe while kmsd runs): kmsd clients, "
        "kmsd stats, kmsd forget CLIENT_ID, kmsd reset [--app NAME]; each has --help.",
    )
    p.add_argument("--version", action="version", version=f"kmsd {__version__}")
    net = p.add_argument_group("network")
    net.add_argument(
        "--listen",
        metavar="HOST:PORT",
        action="append",
        type=parse_listen,
        help="address to listen on; repeat for several; [IPv6]:PORT for IPv6 "
        "(default: 0.0.0.0:1688 and [::]:1688)",
    )
    net.add_argument(
        "--idle-timeout",
        metavar="SECONDS",
        type=positive(float),
        default=30.0,
        help="close a connection after this long without data",
    )
    net.add_argument(
        "--max-connections",
        metavar="N",
        type=positive(int),
        default=1000,
        help="connections served at once; more are refused",
    )
    net.add_argument(
        "--max-pdu",
        metavar="BYTES",
        type=int,
        default=5840,
        help="largest RPC fragment accepted (at least 1432)",
    )
    net.add_argument(
        "--no-ndr64",
        dest="ndr64",
        action="store_false",
        help="refuse NDR64 and answer in NDR32 only, like a pre-Windows 8 host",
    )
    net.add_argument(
        "--no-btfn", dest="btfn", action="store_false", help="refuse bind-time feature negotiation"
    )
    host = p.add_argument_group("KMS host")
    host.add_argument(
        "--activation-interval",
        metavar="MINUTES",
        type=positive(int),
        default=DEFAULT_ACTIVATION_INTERVAL,
        help="how long an unactivated client waits before it retries",
    )
    host.add_argument(
        "--renewal-interval",
        metavar="MINUTES",
        type=positive(int),
        default=DEFAULT_RENEWAL_INTERVAL,
        help="how often an activated client renews",
    )
    host.add_argument(
        "--hwid",
        type=parse_hwid,
        metavar="HEX16",
        help="host hardware ID sent in V6 replies (default: random per start)",
    )
    host.add_argument(
        "--epid",
        metavar="KMS=EPID",
        action="append",
        type=parse_epid_override,
        default=[],
        help="fixed ePID for a KMS counted ID (GUID) or a KMS group "
        "or SKU name; repeatable (default: generated per host key, stable)",
    )
    host.add_argument(
        "--strict",
        action="store_true",
        help="refuse unknown, retail and preview products and App/KMS ID "
        "mismatches with 0xC004F042, as a real host would",
    )
    host.add_argument(
        "--max-clock-skew",
        metavar="HOURS",
        type=positive(float),
        help="refuse requests whose time is further off than this with "
        "0xC004F06C (a real host allows 4 hours); default: accept any time",
    )
    host.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="accept requests with a bad V4 MAC or bad V5/V6 padding",
    )
    store = p.add_argument_group("client table")
    store.add_argument(
        "--db",
        metavar="PATH",
        default=str(default_path()),
        help=f"SQLite database of the client table and the host's identity; "
        f"{MEMORY} for a throwaway run",
    )
    store.add_argument(
        "--precharge",
        metavar="N",
        type=non_negative,
        default=0,
        help="lab override: report N more clients than counted, so that the "
        "first client already meets its threshold (24 for Windows clients)",
    )
    store.add_argument(
        "--fixed-count",
        metavar="N",
        type=non_negative,
        help="lab override: report this count to every client",
    )
    store.add_argument(
        "--capacity",
        metavar="N",
        type=positive(int),
        help="lab override: a fixed table size instead of 2 x the highest threshold seen",
    )
    store.add_argument(
        "--record-lifetime",
        metavar="DAYS",
        type=positive(float),
        default=RECORD_LIFETIME / 86400,
        help="how long a client's record counts (a real host: 30)",
    )
    out = p.add_argument_group("logging")
    out.add_argument(
        "--log-format",
        choices=("console", "json"),
        default="console",
        help="human-readable lines, or one JSON object per line",
    )
    out.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    return p


def open_store(args: argparse.Namespace) -> SqliteStore:
    db = products()
    return SqliteStore(
        args.db,
        known=frozenset(db.applications),
        lifetime=args.record_lifetime * 86400,
        fixed_capacity=args.capacity,
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
    policy = HostPolicy(
        activation_interval=args.activation_interval,
        renewal_interval=args.renewal_interval,
        strict=args.strict,
        verify=args.verify,
        max_clock_skew=args.max_clock_skew * 3600 if args.max_clock_skew else None,
        fixed_count=args.fixed_count,
        precharge=args.precharge,
    )
    return KmsHost(store, identity, policy, database=db)


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


async def serve(args: argparse.Namespace, settings: ServerSettings) -> None:
    store = open_store(args)
    try:
        host = make_host(args, store)
        store.start(asyncio.get_running_loop())
        server = KmsServer(host, settings, store=store)
        await server.start()
    except BaseException:
        await store.close()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log_overrides(args)
    log.info(
        "kmsd ready",
        version=__version__,
        database=args.db,
        hwid=host.identity.hwid.hex().upper(),
        strict=host.policy.strict,
    )
    await stop.wait()
    log.info("stopping", connections=len(server.connections))
    await server.stop()
    await store.close()
    await server.drained()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in admin.COMMANDS:
        return admin.main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_pdu < 1432 or args.max_pdu > 65535:
        parser.error("--max-pdu must be between 1432 and 65535 (DCE-RPC's minimum fragment)")
    logs.configure(args.log_format, args.log_level)
    listen = tuple(args.listen or (("0.0.0.0", DEFAULT_PORT), ("::", DEFAULT_PORT)))
    settings = ServerSettings(
        listen=listen,
        idle_timeout=args.idle_timeout,
        max_connections=args.max_connections,
        max_pdu=args.max_pdu,
        ndr64=args.ndr64,
        btfn=args.btfn,
    )
    if not args.listen and not _ipv6_available():
        settings = ServerSettings(**{**settings.__dict__, "listen": listen[:1]})
    try:
        asyncio.run(serve(args, settings))
    except (OSError, StoreError) as exc:
        log.error("cannot start", error=str(exc))
        return 1
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
