"""Publication of `_vlmcs._tcp.<zone>` SRV and the target's A/AAAA by RFC 2136 dynamic update.

kmsd adds exactly the records it stands for and, on a clean stop, deletes exactly those
(other hosts' SRV records in the same RRset are never touched). Updates go over TCP to the
zone's primary, signed with TSIG when a key is configured. A failed update is logged with
the server's RCODE and retried with backoff; publication never stops kmsd from serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.IN.SRV
import dns.resolver
import dns.tsig
import dns.update
import structlog

from ..addresses import join_host_port
from ..protocol.constants import DNS_PORT, SRV_SERVICE
from .gss import Exchange, GssCredentials, GssError, GssSigner, SambaVariant
from .keyfile import read_key

log = structlog.get_logger("kmsd")

SERVICE = dns.name.from_text(SRV_SERVICE, origin=None)
ADDRESS_POLL = 60.0  # seconds between checks whether the host's addresses changed
FIRST_BACKOFF = 1.0  # seconds before the first retry of a failed update; doubles each time
MAX_BACKOFF = 300.0
UPDATE_TIMEOUT = 5.0  # seconds for one update exchange
WITHDRAW_TIMEOUT = 3.0  # a stopping kmsd waits no longer than this for its records to go

# Failures after which an update may or may not have been applied.
UNCERTAIN = frozenset({"TIMEOUT", "NETWORK"})

# What a TSIG error the primary reported in its answer means (dnspython raises for them).
_TSIG_ERRORS: dict[type[Exception], str] = {
    dns.tsig.PeerBadKey: "BADKEY",
    dns.tsig.PeerBadSignature: "BADSIG",
    dns.tsig.PeerBadTime: "BADTIME",
    dns.tsig.PeerBadTruncation: "BADTRUNC",
}


@dataclass(frozen=True)
class PublishSettings:
    zone: dns.name.Name
    host: dns.name.Name  # the SRV target
    server: tuple[str, int] | None  # the zone's primary; None: its SOA MNAME
    key: dns.tsig.Key | None  # TSIG with a shared key
    gss: GssCredentials | None  # GSS-TSIG (exclusive with key)
    addresses: tuple[str, ...]  # A/AAAA to publish; empty: those kmsd listens on
    priority: int
    weight: int
    ttl: int
    interval: float  # seconds between re-publications

    @property
    def srv_name(self) -> dns.name.Name:
        return SERVICE.concatenate(self.zone)

    def credentials(self) -> str:
        """How updates are signed, for logs and dns-check."""
        if self.gss is not None:
            return "GSS-TSIG as " + self.gss.describe()
        if self.key is not None:
            return f"TSIG key {self.key.name.to_text(True)}"
        return "unsigned"


@dataclass(frozen=True)
class Publication:
    """The records one kmsd stands for: one SRV rdata and the target's addresses."""

    srv_name: dns.name.Name
    target: dns.name.Name
    port: int
    priority: int
    weight: int
    ttl: int
    addresses: frozenset[str] = field(default_factory=frozenset)
    zone: dns.name.Name = dns.name.root

    @property
    def srv(self) -> str:
        return f"{self.priority} {self.weight} {self.port} {self.target}"

    @property
    def owns_target(self) -> bool:
        """Addresses are published only for a target inside the zone being updated."""
        return self.target.is_subdomain(self.zone)

    def address_rdatas(self) -> list[tuple[str, str]]:
        return [(_address_type(a), a) for a in sorted(self.addresses)] if self.owns_target else []


class UpdateFailed(Exception):
    """The primary did not apply an update: its RCODE (or TIMEOUT/NETWORK) and why."""

    def __init__(self, rcode: str, detail: str) -> None:
        super().__init__(f"{rcode}: {detail}")
        self.rcode = rcode
        self.detail = detail


def _address_type(address: str) -> str:
    return "AAAA" if ipaddress.ip_address(address).version == 6 else "A"


def update_message(
    zone: dns.name.Name,
    key: dns.tsig.Key | None,
    *,
    add: Publication | None = None,
    remove: Publication | None = None,
    stale: Sequence[dns.rdtypes.IN.SRV.SRV] = (),
) -> dns.update.UpdateMessage:
    """One atomic update: delete `remove`'s records and `stale` SRV rdata, add `add`'s.

    Deletions name the exact rdata, so other hosts' records in the same RRsets stay."""
    msg = dns.update.UpdateMessage(zone)
    if key is not None:
        msg.use_tsig(key)
    # An update is applied in order: what is deleted and added again stays.
    if remove is not None:
        msg.delete(remove.srv_name, "SRV", remove.srv)
        for rdtype, address in remove.address_rdatas():
            msg.delete(remove.target, rdtype, address)
    for rdata in stale:
        msg.delete(SERVICE.concatenate(zone), rdata)
    if add is not None:
        msg.add(add.srv_name, add.ttl, "SRV", add.srv)
        for rdtype, address in add.address_rdatas():
            msg.add(add.target, add.ttl, rdtype, address)
    return msg


async def exchange(
    msg: dns.message.Message, server: tuple[str, int], timeout: float = UPDATE_TIMEOUT
) -> bytes:
    """One DNS exchange over TCP: the answer's wire form, unparsed (its TSIG is checked by
    the caller, who knows the key). UpdateFailed TIMEOUT/NETWORK when there is none."""
    wire = msg.to_wire()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(server[0], server[1])
            writer.write(len(wire).to_bytes(2, "big") + wire)
            await writer.drain()
            size = int.from_bytes(await reader.readexactly(2), "big")
            return await reader.readexactly(size)
    except TimeoutError:
        raise UpdateFailed("TIMEOUT", f"no answer from the primary within {timeout:g} s") from None
    except (OSError, EOFError) as exc:
        raise UpdateFailed("NETWORK", str(exc) or type(exc).__name__) from None
    finally:
        if writer is not None:
            writer.close()


def read_answer(wire: bytes, request: dns.message.Message) -> dns.message.Message:
    """The answer to `request`, its TSIG signature checked when the request was signed.

    Samba signs over the request MAC without its length bytes; that variant is accepted
    for GSS-TSIG (see gss.SambaVariant). UpdateFailed for an answer that is not to be
    trusted, and for an error answer whose signature does not verify."""
    key = request.keyring if request.had_tsig else None
    try:
        if not isinstance(key, dns.tsig.Key):
            return dns.message.from_wire(wire, keyring=False)
        try:
            return dns.message.from_wire(wire, keyring=key, request_mac=request.mac)
        except dns.tsig.BadSignature:
            if key.algorithm != dns.tsig.GSS_TSIG:
                raise
            context: Any = SambaVariant(key.secret, request.mac or b"")
            variant = dns.tsig.Key(key.name, context, key.algorithm)
            return dns.message.from_wire(wire, keyring=variant, request_mac=b"")
    except tuple(_TSIG_ERRORS) as exc:
        # The primary refused the signature and said why in its (unsigned) TSIG record.
        raise UpdateFailed("NOTAUTH", f"TSIG error {_TSIG_ERRORS[type(exc)]}") from None
    except dns.tsig.BadSignature:
        unverified = dns.message.from_wire(wire, keyring=False)
        rcode = unverified.rcode()
        if rcode == dns.rcode.NOERROR:
            raise UpdateFailed("NOTAUTH", "the primary's answer has a bad TSIG signature") from None
        # A refusal is believed all the same (it changes nothing here): Samba signs the
        # updates it refuses with the request's own MAC.
        detail = f"{_refusal(rcode, request)} (the answer's signature does not verify)"
        raise UpdateFailed(dns.rcode.to_text(rcode), detail) from None
    except dns.exception.FormError as exc:
        unsigned = dns.message.from_wire(wire, keyring=False)
        if unsigned.rcode() != dns.rcode.NOERROR and not unsigned.had_tsig:
            return unsigned  # a refusal need not be signed
        raise UpdateFailed("FORMERR", f"the primary's answer: {exc}") from None
    except dns.exception.DNSException as exc:
        raise UpdateFailed("FORMERR", f"the primary's answer: {exc}") from None


async def send_update(
    msg: dns.message.Message, server: tuple[str, int], timeout: float = UPDATE_TIMEOUT
) -> None:
    """Send an update over TCP; UpdateFailed unless the primary answered NOERROR."""
    response = read_answer(await exchange(msg, server, timeout), msg)
    rcode = response.rcode()
    if rcode != dns.rcode.NOERROR:
        raise UpdateFailed(dns.rcode.to_text(rcode), _refusal(rcode, msg))


def _refusal(rcode: int, msg: dns.message.Message) -> str:
    """Why a primary answering `rcode` to `msg` most likely did not apply it."""
    if rcode not in (dns.rcode.REFUSED, dns.rcode.SERVFAIL, dns.rcode.NOTAUTH):
        return "the primary did not apply the update"
    if not msg.had_tsig:
        return "refused unsigned: the zone may accept signed updates only (TSIG or GSS-TSIG)"
    return (
        "refused by the server's policy: these credentials may not change these names "
        "(another account may own them)"
    )


async def primary_name(zone: dns.name.Name, server: tuple[str, int]) -> dns.name.Name:
    """The zone's primary name server as `server` tells (its SOA MNAME)."""
    query = dns.message.make_query(zone, "SOA")
    answer = read_answer(await exchange(query, server), query)
    rrset = answer.get_rrset(answer.answer, zone, dns.rdataclass.IN, dns.rdatatype.SOA)
    if not rrset:
        rcode = dns.rcode.to_text(answer.rcode())
        raise UpdateFailed("NETWORK", f"{_fmt(server)} gave no SOA for {zone} ({rcode})")
    mname: dns.name.Name = rrset[0].mname
    return mname


async def primary_of(zone: dns.name.Name) -> tuple[str, int]:
    """The zone's primary server: its SOA MNAME, resolved through the system's resolver."""
    try:
        soa = await dns.asyncresolver.resolve(zone, "SOA")
        mname = soa[0].mname
        for rdtype in ("A", "AAAA"):
            try:
                answer = await dns.asyncresolver.resolve(mname, rdtype)
            except dns.resolver.NoAnswer:
                continue
            return answer[0].address, DNS_PORT
    except dns.exception.DNSException as exc:
        raise UpdateFailed("NETWORK", f"cannot find the primary of {zone}: {exc}") from None
    raise UpdateFailed("NETWORK", f"the primary of {zone} ({mname}) has no address")


def route_address(server: tuple[str, int]) -> str | None:
    """The local address the kernel uses to reach `server` (the host's address on that path)."""
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(server)
            return str(sock.getsockname()[0])
    except OSError:
        return None


async def current_srv(name: dns.name.Name, server: tuple[str, int]) -> list[dns.rdtypes.IN.SRV.SRV]:
    query = dns.message.make_query(name, "SRV")
    response = await dns.asyncquery.tcp(query, server[0], timeout=UPDATE_TIMEOUT, port=server[1])
    rrset = response.get_rrset(response.answer, name, dns.rdataclass.IN, dns.rdatatype.SRV)
    return [r for r in rrset or () if isinstance(r, dns.rdtypes.IN.SRV.SRV)]


Sender = Callable[[dns.message.Message, tuple[str, int]], Awaitable[None]]
Reader = Callable[[dns.name.Name, tuple[str, int]], Awaitable[list[dns.rdtypes.IN.SRV.SRV]]]


class Publisher:
    """Keeps this host's SRV and address records in the zone while kmsd runs."""

    def __init__(
        self,
        settings: PublishSettings,
        listening: Sequence[tuple[str, int]],
        *,
        send: Sender = send_update,
        read: Reader = current_srv,
        local_address: Callable[[tuple[str, int]], str | None] = route_address,
        clock: Callable[[], float] = time.monotonic,
        exchange: Exchange = exchange,
    ) -> None:
        self.settings = settings
        self.listening = tuple(listening)
        self.send = send
        self.read = read
        self.local_address = local_address
        self.clock = clock
        self.published: Publication | None = None
        self.server = settings.server
        self.attempted: Publication | None = None  # sent, maybe applied, not confirmed
        self.gss: GssSigner | None = None
        self.exchange = exchange
        self._wake = asyncio.Event()
        self._checked_stale = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    def state(self) -> dict[str, Any]:
        """What the admin endpoint and the metrics show of this publication."""
        published = self.published
        return {
            "zone": str(self.settings.zone).rstrip("."),
            "server": _fmt(self.server),
            "published": published is not None,
            "srv": published.srv if published else None,
            "addresses": sorted(published.addresses) if published else [],
        }

    async def stop(self) -> None:
        """Let an update in flight finish (bounded), then withdraw the records."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._task, UPDATE_TIMEOUT)  # cancelled on timeout
        await self.withdraw()

    def reconfigure(self, settings: PublishSettings) -> None:
        """New priority, weight, TTL or interval (a reload): published at once."""
        self.settings = settings
        self._wake.set()

    async def signing_key(self, server: tuple[str, int]) -> dns.tsig.Key | None:
        """The key to sign with: the TSIG key, a GSS-TSIG context's (set up or renewed
        when due), or None for unsigned updates."""
        creds = self.settings.gss
        if creds is None:
            return self.settings.key
        if self.gss is None or self.gss.creds != creds:
            self.gss = GssSigner(creds)
        try:
            service = creds.service
            if service is None:
                service = "DNS@" + (await primary_name(self.settings.zone, server)).to_text(True)
            return await self.gss.signing_key(server, service, self.exchange)
        except GssError as exc:
            raise UpdateFailed("GSSAPI", f"{exc.reason}: {exc.detail}") from None
        except dns.exception.DNSException as exc:
            raise UpdateFailed("GSSAPI", f"TKEY exchange: {exc}") from None

    def addresses(self, server: tuple[str, int]) -> frozenset[str]:
        """The configured addresses, else those kmsd listens on; for a wildcard listener,
        the address this host uses to reach the primary."""
        if self.settings.addresses:
            return frozenset(self.settings.addresses)
        found = set()
        for host, _ in self.listening:
            ip = ipaddress.ip_address(host.split("%")[0])
            if not ip.is_unspecified:
                found.add(str(ip))
            elif ip.version == ipaddress.ip_address(server[0]).version:
                route = self.local_address(server)
                if route is not None:
                    found.add(route)
        return frozenset(found)

    def desired(self, server: tuple[str, int]) -> Publication:
        s = self.settings
        addresses = self.addresses(server)
        if not addresses and s.host.is_subdomain(s.zone):
            raise UpdateFailed("NETWORK", "no address of this host to publish")
        return Publication(
            s.srv_name,
            s.host,
            self.listening[0][1],
            s.priority,
            s.weight,
            s.ttl,
            addresses,
            s.zone,
        )

    async def publish(self) -> Publication:
        """Bring the zone to the desired state once; UpdateFailed when it could not."""
        if self.server is None:
            self.server = await primary_of(self.settings.zone)
        server = self.server
        want = self.desired(server)
        stale: list[dns.rdtypes.IN.SRV.SRV] = []
        if not self._checked_stale:
            # Records an earlier run left behind (a crash) with other priority or weight.
            try:
                current = await self.read(want.srv_name, server)
            except (OSError, EOFError, dns.exception.DNSException) as exc:
                raise UpdateFailed("NETWORK", f"cannot read the SRV records: {exc}") from None
            stale = [
                r
                for r in current
                if r.target == want.target and r.port == want.port and r.to_text() != want.srv
            ]
        remove = self.published if self.published != want else None
        key = await self.signing_key(server)
        self.attempted = want
        msg = update_message(self.settings.zone, key, add=want, remove=remove, stale=stale)
        try:
            await self.send(msg, server)
        except UpdateFailed as exc:
            if exc.rcode not in UNCERTAIN:
                self.attempted = None  # the primary answered: nothing of it was applied
            if exc.rcode == "NOTAUTH" and self.gss is not None:
                self.gss.forget()  # the server may have lost the context: set up a new one
            raise
        self._checked_stale = True
        self.published = want
        return want

    async def run(self) -> None:
        """Publish now, again every interval and whenever the addresses or settings change;
        a failure is logged and retried with backoff. Runs until cancelled."""
        backoff = FIRST_BACKOFF
        due = self.clock()
        while not self._stopping:
            now = self.clock()
            changed = self.server is not None and self._differs()
            if now >= due or changed or self.published is None:
                try:
                    done = await self.publish()
                except UpdateFailed as exc:
                    log.warning(
                        "dns update failed",
                        zone=str(self.settings.zone),
                        server=_fmt(self.server),
                        rcode=exc.rcode,
                        error=exc.detail,
                        credentials=self.settings.credentials(),
                        retry_in=backoff,
                    )
                    wait, backoff = backoff, min(backoff * 2, MAX_BACKOFF)
                else:
                    log.info(
                        "dns published",
                        zone=str(self.settings.zone),
                        server=_fmt(self.server),
                        srv=f"{done.srv_name} {done.srv}",
                        addresses=sorted(done.addresses) if done.owns_target else [],
                        ttl=done.ttl,
                    )
                    backoff = FIRST_BACKOFF
                    due = self.clock() + self.settings.interval
                    wait = min(ADDRESS_POLL, self.settings.interval)
            else:
                wait = min(ADDRESS_POLL, due - now)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    def _differs(self) -> bool:
        assert self.server is not None
        try:
            return self.desired(self.server) != self.published
        except UpdateFailed:
            return True

    async def withdraw(self, timeout: float = WITHDRAW_TIMEOUT) -> None:
        """Delete exactly the records this host published; logged, never raises."""
        published, server = self.published or self.attempted, self.server
        if published is None or server is None:
            return
        try:
            async with asyncio.timeout(timeout):
                msg = update_message(
                    self.settings.zone, await self.signing_key(server), remove=published
                )
                if self.attempted not in (None, published):
                    # Deleting what is not there is no error (RFC 2136), so an update that
                    # may or may not have been applied is withdrawn too.
                    extra = update_message(self.settings.zone, None, remove=self.attempted)
                    msg.update.extend(extra.update)
                await self.send(msg, server)
        except (UpdateFailed, TimeoutError) as exc:
            rcode = exc.rcode if isinstance(exc, UpdateFailed) else "TIMEOUT"
            log.warning(
                "dns withdraw failed", zone=str(self.settings.zone), rcode=rcode, error=str(exc)
            )
            return
        self.published = self.attempted = None
        log.info(
            "dns withdrawn",
            zone=str(self.settings.zone),
            srv=f"{published.srv_name} {published.srv}",
        )


def _fmt(server: tuple[str, int] | None) -> str | None:
    return None if server is None else join_host_port(*server)


def make_settings(
    *,
    zone: str,
    host: str,
    server: tuple[str, int] | None,
    key: Path | None,
    gss: GssCredentials | None,
    addresses: tuple[str, ...],
    priority: int,
    weight: int,
    ttl: int,
    interval: float,
) -> PublishSettings:
    """The publication settings of kmsd's [dns] options; KeyFileError (a ValueError) when
    the key file cannot be used."""
    return PublishSettings(
        zone=dns.name.from_text(zone),
        host=dns.name.from_text(host),
        server=server,
        key=read_key(key) if key is not None else None,
        gss=gss,
        addresses=addresses,
        priority=priority,
        weight=weight,
        ttl=ttl,
        interval=interval,
    )
