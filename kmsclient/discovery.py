"""Finding a KMS host through DNS, as a KMS client does (seed: "Client discovery of the Key
Management Service").

- `Resolver`: `_vlmcs._tcp.<suffix>` SRV and A/AAAA queries over UDP (asyncio-dgram, dnslib),
  again over TCP when the answer is truncated. Each query has a random ID and a random source
  port; a datagram whose source, ID or question does not match is dropped and the wait goes
  on; every wait is bounded and the tries are counted.
- `order`: the RFC 2782 order: lowest priority first; within a priority, a weighted random
  draw without replacement (weight 0 only by a small chance while others weigh more).
- `find_host`: the cached host first; when it fails, or there is none, the hosts of each
  suffix in that order, a host that does not answer being dropped for the next. The host that
  answered is cached for the next activation and renewal.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import os
import random
import secrets
import struct
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import asyncio_dgram
import dnslib
from dnslib.label import DNSLabelError

from kmsd.addresses import join_host_port, parse_ip_port
from kmsd.protocol.constants import DNS_PORT, SRV_SERVICE

from .activation import Result
from .outcome import Status
from .target import Target

QUERY_TIMEOUT = 2.0  # seconds to wait for one answer
QUERY_TRIES = 3  # rounds over the nameservers before a query fails
EDNS_PAYLOAD = 1232  # the UDP size offered (DNS flag day 2020)
RESOLV_CONF = Path("/etc/resolv.conf")
SOURCE_PORTS = (1024, 65535)
# An answer from any of these means the host is a KMS host that answered; anything else
# (nothing listens, no answer, not genuine) sends the client to the next host.
ANSWERED = frozenset({Status.ACTIVATED, Status.BELOW_THRESHOLD, Status.REFUSED})

Nameserver = tuple[str, int]


class DnsError(Exception):
    """A query that got no usable answer from any nameserver."""


@dataclass(frozen=True)
class SrvRecord:
    priority: int
    weight: int
    port: int
    target: str  # absolute, lower case, without the final dot
    ttl: int = 0


@dataclass(frozen=True)
class Candidate:
    """One SRV record and the addresses of its target."""

    record: SrvRecord
    addresses: tuple[str, ...] = ()
    domain: str = ""

    @property
    def priority(self) -> int:
        return self.record.priority

    @property
    def weight(self) -> int:
        return self.record.weight

    @property
    def key(self) -> tuple[str, int]:
        return self.record.target, self.record.port

    def __str__(self) -> str:
        return f"{self.record.target}:{self.record.port}"


# Selection (RFC 2782): pure, the random source passed in.


class Ranked(Protocol):
    @property
    def priority(self) -> int: ...

    @property
    def weight(self) -> int: ...


R = TypeVar("R", bound=Ranked)


def order(records: Sequence[R], rng: random.Random, ignore_priority: bool = False) -> list[R]:
    """The order in which to try `records`. With `ignore_priority`, priority and weight are
    ignored and the answer's order is kept (vlmcs -P)."""
    if ignore_priority:
        return list(records)
    result: list[R] = []
    for priority in sorted({r.priority for r in records}):
        remaining = [r for r in records if r.priority == priority]
        while remaining:
            # RFC 2782: weight-0 records first, a number in [0, total], the first record
            # whose running sum reaches it. Zero weights are shuffled so that, all being
            # zero, each is equally likely; without any, 0 is not drawn, else the first
            # record would win one extra time in total + 1 (the choice follows the weights).
            zeros = [r for r in remaining if r.weight == 0]
            rng.shuffle(zeros)
            arranged = zeros + [r for r in remaining if r.weight != 0]
            pick = rng.randint(0 if zeros else 1, sum(r.weight for r in arranged))
            running = 0
            for chosen in arranged:
                running += chosen.weight
                if running >= pick:
                    break
            result.append(chosen)
            remaining.remove(chosen)
    return result


# The system's resolver configuration.


def parse_nameserver(text: str) -> Nameserver:
    """IP, IP:PORT or [IPv6]:PORT; raises ValueError."""
    return parse_ip_port(text, DNS_PORT, "a nameserver")


def system_config(path: Path = RESOLV_CONF) -> tuple[list[Nameserver], list[str]]:
    """Nameservers and search list of resolv.conf (with its defaults: 127.0.0.1, none)."""
    servers: list[Nameserver] = []
    search: list[str] = []
    try:
        lines = path.read_text("utf-8", "replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        words = line.split("#")[0].split(";")[0].split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                servers.append(parse_nameserver(words[1].split("%")[0]))
            except ValueError:
                continue
        elif len(words) >= 2 and words[0] in ("search", "domain"):
            search = [w.rstrip(".") for w in words[1:]]
    return servers or [("127.0.0.1", DNS_PORT)], search


# Queries.


def _same_address(peer: object, server: Nameserver) -> bool:
    if not isinstance(peer, tuple) or len(peer) < 2:
        return False
    try:
        host = ipaddress.ip_address(str(peer[0]).split("%")[0])
    except ValueError:
        return False
    return host == ipaddress.ip_address(server[0]) and peer[1] == server[1]


def matching_reply(data: bytes, qid: int, qname: str, qtype: str) -> dnslib.DNSRecord | None:
    """The reply to our query, or None when `data` is not it (ID, question, not a reply)."""
    try:
        reply = dnslib.DNSRecord.parse(data)
    except (
        dnslib.DNSError,
        DNSLabelError,
        IndexError,
        struct.error,
        UnicodeDecodeError,
        ValueError,
    ):
        return None
    if reply.header.id != qid or not reply.header.qr or len(reply.questions) != 1:
        return None
    q = reply.q
    if (
        str(q.qname).rstrip(".").lower() != qname.rstrip(".").lower()
        or q.qtype != getattr(dnslib.QTYPE, qtype)
        or q.qclass != 1  # IN
    ):
        return None
    return reply


def srv_records(reply: dnslib.DNSRecord, name: str) -> list[SrvRecord]:
    """The SRV records for `name` in a reply's answer, in order; target "." (RFC 2782:
    decidedly not available here) left out."""
    records = [
        SrvRecord(rr.rdata.priority, rr.rdata.weight, rr.rdata.port, _name(rr.rdata.target), rr.ttl)
        for rr in reply.rr
        if rr.rtype == dnslib.QTYPE.SRV and _name(rr.rname) == name.lower()
    ]
    return [r for r in records if r.target]


def _name(label: object) -> str:
    return str(label).rstrip(".").lower()


class Resolver:
    """Queries sent to the given nameservers, in turn, over UDP with TCP for truncation."""

    def __init__(
        self,
        nameservers: Sequence[Nameserver],
        timeout: float = QUERY_TIMEOUT,
        tries: int = QUERY_TRIES,
    ) -> None:
        self.nameservers = list(nameservers)
        self.timeout = timeout
        self.tries = tries
        self.dropped = 0  # datagrams ignored: wrong source, ID or question

    async def query(self, name: str, qtype: str) -> dnslib.DNSRecord:
        """An answer with NOERROR or NXDOMAIN; DnsError when no nameserver gave one."""
        problems: list[str] = []
        for _ in range(self.tries):
            for server in self.nameservers:
                where = join_host_port(*server)
                try:
                    reply = await self._exchange(server, name, qtype)
                except TimeoutError:
                    problems.append(f"{where}: no answer within {self.timeout:g} s")
                    continue
                except (OSError, EOFError, asyncio.IncompleteReadError) as exc:
                    problems.append(f"{where}: {exc.strerror if isinstance(exc, OSError) else exc}")
                    continue
                rcode = reply.header.rcode
                if rcode in (dnslib.RCODE.NOERROR, dnslib.RCODE.NXDOMAIN):
                    return reply
                problems.append(f"{where}: {dnslib.RCODE.get(rcode, str(rcode))}")
        detail = problems[-1] if problems else "no nameserver"
        raise DnsError(f"{name} {qtype}: {detail} ({len(problems)} tries)")

    async def _exchange(self, server: Nameserver, name: str, qtype: str) -> dnslib.DNSRecord:
        qid = secrets.randbelow(0x10000)
        query = dnslib.DNSRecord(
            dnslib.DNSHeader(id=qid, rd=1),
            q=dnslib.DNSQuestion(name, getattr(dnslib.QTYPE, qtype)),
            ar=[dnslib.EDNS0(udp_len=EDNS_PAYLOAD)],
        )
        packet: bytes = query.pack()
        reply = await self._udp(server, packet, qid, name, qtype)
        if reply.header.tc:
            reply = await self._tcp(server, packet, qid, name, qtype)
        return reply

    async def _udp(
        self, server: Nameserver, packet: bytes, qid: int, name: str, qtype: str
    ) -> dnslib.DNSRecord:
        stream = await _random_port_socket(server)
        try:
            await stream.send(packet, server)
            async with asyncio.timeout(self.timeout):
                while True:
                    data, peer = await stream.recv()
                    reply = matching_reply(data, qid, name, qtype)
                    if reply is not None and _same_address(peer, server):
                        return reply
                    self.dropped += 1
        finally:
            stream.close()

    async def _tcp(
        self, server: Nameserver, packet: bytes, qid: int, name: str, qtype: str
    ) -> dnslib.DNSRecord:
        async with asyncio.timeout(self.timeout):
            reader, writer = await asyncio.open_connection(server[0], server[1])
            try:
                writer.write(struct.pack("!H", len(packet)) + packet)
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                data = await reader.readexactly(length)
            finally:
                writer.close()
        reply = matching_reply(data, qid, name, qtype)
        if reply is None:
            self.dropped += 1
            raise EOFError("the TCP answer does not match the query")
        return reply

    async def addresses(self, name: str) -> tuple[str, ...]:
        """The A, then AAAA, addresses of `name` (following CNAMEs within each answer)."""
        found: list[str] = []
        for qtype in ("A", "AAAA"):
            try:
                reply = await self.query(name, qtype)
            except DnsError:
                continue
            found.extend(_addresses_in(reply.rr, {name.rstrip(".").lower()}, follow=True))
        return tuple(dict.fromkeys(found))

    async def srv(self, domain: str) -> list[Candidate]:
        """The `_vlmcs._tcp.<domain>` records in the answer's order, each with the addresses
        of its target: from the additional section, else queried."""
        name = f"{SRV_SERVICE}.{domain.rstrip('.')}"
        reply = await self.query(name, "SRV")
        candidates = []
        for record in srv_records(reply, name):
            found = tuple(_addresses_in(reply.ar, {record.target}))
            if not found:
                found = await self.addresses(record.target)
            candidates.append(Candidate(record, found, domain))
        return candidates


def _addresses_in(rrs: Iterable[dnslib.RR], names: set[str], follow: bool = False) -> list[str]:
    found = []
    for rr in rrs:
        owner = _name(rr.rname)
        if follow and rr.rtype == dnslib.QTYPE.CNAME and owner in names:
            names.add(_name(rr.rdata.label))
        elif rr.rtype in (dnslib.QTYPE.A, dnslib.QTYPE.AAAA) and owner in names:
            found.append(str(rr.rdata))
    return found


async def _random_port_socket(server: Nameserver) -> asyncio_dgram.DatagramServer:
    """An unconnected UDP socket on a random port (the source check is ours, not the
    kernel's, so that a datagram from elsewhere is seen and dropped)."""
    wildcard = "::" if ":" in server[0] else "0.0.0.0"
    for _ in range(16):
        port = SOURCE_PORTS[0] + secrets.randbelow(SOURCE_PORTS[1] - SOURCE_PORTS[0] + 1)
        try:
            return await asyncio_dgram.bind((wildcard, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    return await asyncio_dgram.bind((wildcard, 0))


# The cached host.


def default_state_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "kmsclient" / "kms-host.json"


@dataclass(frozen=True)
class CachedHost:
    name: str
    port: int


class HostCache:
    """The host that last answered, per search list, in a small JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads(self.path.read_text("utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, domains: Sequence[str]) -> CachedHost | None:
        entry = self._load().get(_cache_key(domains))
        if not isinstance(entry, dict):
            return None
        name, port = entry.get("name"), entry.get("port")
        if isinstance(name, str) and isinstance(port, int):
            return CachedHost(name, port)
        return None

    def put(self, domains: Sequence[str], host: CachedHost | None) -> None:
        data = self._load()
        key = _cache_key(domains)
        if host is None:
            if data.pop(key, None) is None:
                return
        else:
            data[key] = {"name": host.name, "port": host.port}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(data, indent=1) + "\n", "utf-8")
        temporary.replace(self.path)


def _cache_key(domains: Sequence[str]) -> str:
    return " ".join(d.rstrip(".").lower() for d in domains)


# Failover.


@dataclass(frozen=True)
class Attempt:
    host: str  # the SRV target (or cached name)
    target: Target  # the address tried
    status: Status
    kind: str | None  # the failure's kind, None when it answered


@dataclass
class Found:
    """How discovery went: the answering result (or the last failure) and every step."""

    result: Result | None = None
    source: str | None = None  # "cache" or "dns"
    attempts: list[Attempt] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # DNS problems, per suffix
    records: dict[str, list[Candidate]] = field(default_factory=dict)

    @property
    def answered(self) -> bool:
        return self.result is not None and self.result.status in ANSWERED


Try = Callable[[Target], Awaitable[Result]]


async def find_host(
    domains: Sequence[str],
    resolver: Resolver,
    cache: HostCache | None,
    attempt: Try,
    rng: random.Random,
    ignore_priority: bool = False,
) -> Found:
    """Run `attempt` against the cached host, else the discovered hosts in RFC 2782 order,
    until one answers; cache that one, forget a cached host that did not answer."""
    found = Found()
    failed: set[tuple[str, int]] = set()
    cached = cache.get(domains) if cache is not None else None
    if cached is not None and cache is not None:
        addresses = await resolver.addresses(cached.name)
        if await _try_host(found, cached.name, cached.port, addresses, attempt, "cache"):
            return found
        cache.put(domains, None)  # the cached host failed: discover again, without it
        failed.add((cached.name, cached.port))
    for domain in domains:
        try:
            candidates = await resolver.srv(domain)
        except DnsError as exc:
            found.errors.append(f"{domain}: {exc}")
            continue
        found.records[domain] = candidates
        if not candidates:
            found.errors.append(f"{domain}: no {SRV_SERVICE} SRV records")
        for candidate in order(candidates, rng, ignore_priority):
            if candidate.key in failed:
                continue
            name, port = candidate.key
            if await _try_host(found, name, port, candidate.addresses, attempt, "dns"):
                if cache is not None:
                    cache.put(domains, CachedHost(name, port))
                return found
            failed.add(candidate.key)
    return found


async def _try_host(
    found: Found, name: str, port: int, addresses: Sequence[str], attempt: Try, source: str
) -> bool:
    if not addresses:
        found.errors.append(f"{name}: no address")
    for address in addresses:
        result = await attempt(Target(address, port))
        kind = result.failure.kind if result.failure is not None else None
        found.attempts.append(Attempt(name, result.target, result.status, kind))
        found.result = result
        if result.status in ANSWERED:
            found.source = source
            return True
    return False
