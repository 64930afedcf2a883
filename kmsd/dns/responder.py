"""`kmsd dns-serve`: an authoritative DNS responder for one zone, for labs without a DNS server.

It answers `_vlmcs._tcp.<zone>` SRV (with the targets' addresses in the additional section),
the targets' A/AAAA, and the zone's SOA and NS, over UDP and TCP. `Zone.answer` is the whole
responder, bytes in and bytes out; the rest adapts it to sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import signal
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import asyncio_dgram
import dnslib
import structlog
from dnslib.label import DNSLabelError

from .. import logs
from ..addresses import join_host_port, parse_bind_address, split_host_port
from ..cliparser import Parser
from ..protocol.constants import DNS_PORT, KMS_PORT, SRV_SERVICE

log = structlog.get_logger("kmsd")

UDP_PLAIN = 512  # largest UDP answer to a query without EDNS (RFC 1035)
UDP_MAX = 4096  # largest UDP answer whatever EDNS offers
TCP_IDLE = 10.0  # seconds a TCP client may stay silent
BIND_TRIES = 20  # ephemeral UDP ports tried until TCP's same port is free too
CLASS_IN, CLASS_ANY = 1, 255


@dataclass(frozen=True)
class KmsEntry:
    """One KMS host the zone advertises."""

    name: str  # relative to the zone
    addresses: tuple[str, ...]
    port: int = KMS_PORT
    priority: int = 0
    weight: int = 0


def parse_kms(text: str, index: int = 1) -> KmsEntry:
    """IP[:PORT] or [IPv6]:PORT, then optional ,priority=N ,weight=N ,name=LABEL."""
    where, *extras = text.split(",")
    host, port = split_host_port(where, KMS_PORT)
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    fields = {"priority": 0, "weight": 0}
    name = f"kms{index}"
    for extra in extras:
        key, sep, value = extra.partition("=")
        if key == "name" and sep and value:
            name = value.rstrip(".")
        elif key in fields and value.isdigit() and int(value) <= 65535:
            fields[key] = int(value)
        else:
            raise ValueError(f"{text!r}: {extra!r}: expected priority=N, weight=N or name=LABEL")
    return KmsEntry(name, (address,), port, fields["priority"], fields["weight"])


def merge(entries: Sequence[KmsEntry]) -> list[KmsEntry]:
    """Entries with the same name and port become one host with several addresses."""
    merged: dict[tuple[str, int], KmsEntry] = {}
    for e in entries:
        key = (e.name.lower(), e.port)
        if key in merged:
            old = merged[key]
            merged[key] = KmsEntry(
                old.name, old.addresses + e.addresses, old.port, old.priority, old.weight
            )
        else:
            merged[key] = e
    return list(merged.values())


class Zone:
    """The records of one zone and the answers to queries about them."""

    def __init__(self, origin: str, hosts: Sequence[KmsEntry], ttl: int = 300) -> None:
        self.origin = dnslib.DNSLabel(origin.rstrip(".") + ".")
        self.ttl = ttl
        zone = str(self.origin)
        lines = [
            f"{zone} {ttl} IN SOA ns.{zone} hostmaster.{zone} 1 3600 600 86400 {ttl}",
            f"{zone} {ttl} IN NS ns.{zone}",
        ]
        for host in hosts:
            target = f"{host.name}.{zone}"
            srv = f"{host.priority} {host.weight} {host.port} {target}"
            lines.append(f"{SRV_SERVICE}.{zone} {ttl} IN SRV {srv}")
            for address in host.addresses:
                rdtype = "AAAA" if ":" in address else "A"
                lines.append(f"{target} {ttl} IN {rdtype} {address}")
        self.records: list[dnslib.RR] = dnslib.RR.fromZone("\n".join(lines))
        self.soa = self.records[0]

    def _at(self, name: dnslib.DNSLabel) -> list[dnslib.RR]:
        return [rr for rr in self.records if rr.rname == name]

    def _exists(self, name: dnslib.DNSLabel) -> bool:
        """The name owns records or is an empty non-terminal (e.g. _tcp.<zone>)."""
        return any(rr.rname == name or rr.rname.matchSuffix(name) for rr in self.records)

    def answer(self, data: bytes, udp: bool = False) -> bytes | None:
        """The reply to one query; None for what deserves no reply (not a query at all).
        Over UDP, a reply longer than the client can take is truncated (TC)."""
        try:
            query = dnslib.DNSRecord.parse(data)
        except (dnslib.DNSError, DNSLabelError, IndexError, struct.error, UnicodeDecodeError):
            return None
        if query.header.qr:
            return None
        reply = dnslib.DNSRecord(
            dnslib.DNSHeader(id=query.header.id, qr=1, aa=1, rd=query.header.rd),
            q=query.q if len(query.questions) == 1 else None,
        )
        reply.header.opcode = query.header.opcode
        edns = next((rr for rr in query.ar if rr.rtype == dnslib.QTYPE.OPT), None)
        if edns is not None:
            reply.add_ar(dnslib.EDNS0(udp_len=UDP_MAX))
        if query.header.opcode != dnslib.OPCODE.QUERY:
            reply.header.rcode = dnslib.RCODE.NOTIMP
        elif len(query.questions) != 1:
            reply.header.rcode = dnslib.RCODE.FORMERR
        else:
            self._resolve(query.q, reply)
        try:
            packed: bytes = reply.pack()
        except (dnslib.DNSError, DNSLabelError, ValueError):
            # dnslib parses names it cannot encode again (a label over 63 bytes once its
            # dots are counted): such a question gets FORMERR without being echoed.
            header = dnslib.DNSHeader(id=query.header.id, qr=1, aa=1, rcode=dnslib.RCODE.FORMERR)
            return bytes(dnslib.DNSRecord(header).pack())
        if udp:
            limit = UDP_PLAIN if edns is None else min(max(edns.rclass, UDP_PLAIN), UDP_MAX)
            if len(packed) > limit:
                # Truncated: header and question only, so the client asks again over TCP.
                short = dnslib.DNSRecord(
                    dnslib.DNSHeader(id=query.header.id, qr=1, aa=1, tc=1, rd=query.header.rd),
                    q=query.q,
                )
                packed = short.pack()
        return packed

    def _resolve(self, question: dnslib.DNSQuestion, reply: dnslib.DNSRecord) -> None:
        name = question.qname
        if not (name == self.origin or name.matchSuffix(self.origin)):
            reply.header.aa = 0
            reply.header.rcode = dnslib.RCODE.REFUSED
            return
        if question.qclass not in (CLASS_IN, CLASS_ANY):
            reply.header.rcode = dnslib.RCODE.REFUSED
            return
        here = self._at(name)
        if not here and not self._exists(name):
            reply.header.rcode = dnslib.RCODE.NXDOMAIN
            reply.add_auth(self.soa)
            return
        wanted = [rr for rr in here if question.qtype in (rr.rtype, dnslib.QTYPE.ANY)]
        for rr in wanted:
            reply.add_answer(rr)
        if not wanted:
            reply.add_auth(self.soa)
        targets = {rr.rdata.target for rr in wanted if rr.rtype == dnslib.QTYPE.SRV}
        for extra in self.records:
            if extra.rname in targets and extra.rtype in (dnslib.QTYPE.A, dnslib.QTYPE.AAAA):
                reply.add_ar(extra)


class _Tcp:
    def __init__(self, zone: Zone) -> None:
        self.zone = zone

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE):
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    data = await reader.readexactly(length)
                reply = self.zone.answer(data)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, OSError):
            pass
        finally:
            writer.close()


class Responder:
    """The zone served over UDP and TCP on each address."""

    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.addresses: list[tuple[str, int]] = []
        self._udp: list[asyncio_dgram.DatagramServer] = []
        self._tcp: list[asyncio.Server] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, listen: Sequence[tuple[str, int]]) -> None:
        try:
            for host, port in listen:
                udp, tcp = await self._bind(host, port)
                self._udp.append(udp)
                self._tcp.append(tcp)
                self._tasks.append(asyncio.create_task(self._serve_udp(udp)))
                bound = udp.sockname
                self.addresses.append((bound[0], bound[1]))
        except OSError:
            await self.stop()
            raise

    async def _bind(
        self, host: str, port: int
    ) -> tuple[asyncio_dgram.DatagramServer, asyncio.Server]:
        """UDP and TCP on the same port; for port 0, one free for both."""
        for _ in range(BIND_TRIES if port == 0 else 1):
            udp = await asyncio_dgram.bind((host, port))
            try:
                tcp = await asyncio.start_server(
                    _Tcp(self.zone), host, udp.sockname[1], reuse_address=True
                )
            except OSError as exc:
                udp.close()
                if port != 0 or exc.errno != errno.EADDRINUSE:
                    raise
                continue
            return udp, tcp
        raise OSError(errno.EADDRINUSE, f"no port free for both UDP and TCP on {host}")

    async def _serve_udp(self, udp: asyncio_dgram.DatagramServer) -> None:
        with contextlib.suppress(asyncio_dgram.TransportClosed):
            while True:
                data, peer = await udp.recv()
                reply = self.zone.answer(data, udp=True)
                if reply is not None:
                    await udp.send(reply, peer)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for udp in self._udp:
            udp.close()
        for tcp in self._tcp:
            tcp.close()
            await tcp.wait_closed()
        self._tasks.clear()
        self._udp.clear()
        self._tcp.clear()


def build_parser(parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """`kmsd dns-serve`'s command line; `parents`: the kmsd options it takes (logging)."""
    p = Parser(
        prog="kmsd dns-serve",
        description="An authoritative DNS responder for one zone that advertises KMS hosts "
        "(_vlmcs._tcp SRV records and the hosts' A/AAAA), over UDP and TCP, for labs "
        "without a DNS server.",
        parents=parents,
    )

    def listen(text: str) -> tuple[str, int]:
        try:
            host, port = parse_bind_address(text, DNS_PORT)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return host, port

    p.add_argument("zone", metavar="ZONE", help="the zone to answer for, e.g. lab.test")
    p.add_argument(
        "--kms",
        action="append",
        required=True,
        metavar="IP[:PORT][,priority=N][,weight=N][,name=LABEL]",
        help="a KMS host to advertise (repeatable): its address and port (default 1688), "
        "its SRV priority and weight (default 0) and its name in the zone (default kmsN); "
        "the same name given twice gets both addresses",
    )
    p.add_argument(
        "--listen",
        type=listen,
        action="append",
        metavar="IP[:PORT]",
        help="address to answer on, UDP and TCP (repeatable; default: 0.0.0.0:53; port 0: "
        "one the system chooses, shown in the log)",
    )
    p.add_argument(
        "--ttl",
        type=int,
        default=300,
        metavar="SECONDS",
        help="TTL of every record (default: %(default)s)",
    )
    return p


async def _serve(zone: Zone, listen: Sequence[tuple[str, int]]) -> None:
    responder = Responder(zone)
    await responder.start(listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for address in responder.addresses:
        log.info("dns listening", address=join_host_port(*address))
    srv = [str(rr.rdata) for rr in zone.records if rr.rtype == dnslib.QTYPE.SRV]
    log.info("dns-serve ready", zone=str(zone.origin), srv=srv)
    await stop.wait()
    await responder.stop()
    log.info("stopped")


def run(
    args: argparse.Namespace, parser: argparse.ArgumentParser, log_format: str, level: str
) -> int:
    """Serve what `args` (of build_parser) says until SIGTERM; the exit status."""
    try:
        hosts = merge([parse_kms(text, i) for i, text in enumerate(args.kms, 1)])
    except ValueError as exc:
        parser.error(f"--kms: {exc}")
    logs.configure(log_format, level)
    zone = Zone(args.zone, hosts, args.ttl)
    try:
        asyncio.run(_serve(zone, args.listen or [("0.0.0.0", DNS_PORT)]))
    except OSError as exc:
        log.error("cannot start", error=str(exc))
        return 1
    return 0
