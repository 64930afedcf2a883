"""Who may connect and how much: allowed networks, connection caps, per-address request rate,
and which connection gives way when every slot is taken."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Hashable, Iterator
from enum import StrEnum
from typing import Generic, TypeVar

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
C = TypeVar("C", bound=Hashable)
_V4_MAPPED = bytes(10) + b"\xff\xff"


def source_of(address: str) -> str:
    """Whose share a connection from `address` counts against: an IPv4 address, or the /64
    of an IPv6 address (a host is usually given a whole /64 and may connect from any
    address in it, so counting addresses would give it a share of the table each)."""
    if ":" not in address:
        return address
    try:
        packed = socket.inet_pton(socket.AF_INET6, address.split("%")[0])
    except OSError:
        return address
    if packed[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"


class Refusal(StrEnum):
    """Why a connection is refused; the value is the metrics label."""

    NOT_ALLOWED = "not_allowed"
    PER_ADDRESS_LIMIT = "per_address_limit"


class _Source(Generic[C]):
    """The open connections of one address, each oldest first: those that have not sent a
    request yet (by when they opened), and those that have (by their last request).
    (A plain class: one is made per connection from a new address, and a dataclass's
    default factories cost more than the rest of it.)"""

    __slots__ = ("connections", "refilled", "served", "tokens", "unserved")

    def __init__(self, tokens: float, refilled: float) -> None:
        self.unserved: dict[C, None] = {}
        self.served: dict[C, None] = {}
        self.connections = 0  # len(unserved) + len(served)
        self.tokens = tokens
        self.refilled = refilled


class Admission(Generic[C]):
    """Connection admission and request rate, per source address (an IPv6 /64 counting
    as one address: see source_of).

    When all `max_connections` slots are taken, a newcomer is not refused: the address with
    the most connections gives one up (the newcomer's own, when it has as many as any), the
    one that has waited longest without a request, else the one idle longest. So idle
    connections cannot lock real clients out, and one address's churn only displaces
    its own. State is kept only for addresses with an open connection, so it is bounded by
    `max_connections`. (A plain class, not a dataclass: mypyc compiles a generic class,
    not a generic dataclass.)
    """

    def __init__(
        self,
        max_connections: int,
        max_per_ip: int,
        allow: tuple[Network, ...],
        rate_per_ip: float,  # requests per second per address; 0: unlimited
    ) -> None:
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.allow = allow
        self.rate_per_ip = rate_per_ip
        self._burst = max(1.0, 2 * rate_per_ip)  # requests an address may send at once
        self._sources: dict[str, _Source[C]] = {}
        # connections -> addresses with that many, in the order they came to have it
        self._by_count: dict[int, dict[str, None]] = {}
        self._most = 0  # connections of the address with the most
        self.open = 0  # connections registered

    def admit(
        self, address: str, conn: C, now: float, source_key: str | None = None
    ) -> tuple[Refusal | None, C | None]:
        """Register `conn`, new from `address`. Returns why it is refused (and None), or
        None and the connection to close to make room for it (already forgotten here).
        `source_key`: the source_of() the address, when the caller has it already."""
        if self.allow and not self.allowed(address):
            return Refusal.NOT_ALLOWED, None
        address = source_of(address) if source_key is None else source_key
        source = self._sources.get(address)
        if source is not None and source.connections >= self.max_per_ip:
            return Refusal.PER_ADDRESS_LIMIT, None
        victim = None
        if self.open >= self.max_connections:
            victim = self._victim(address)
            source = self._sources.get(address)  # the victim may have been its last
        self.open += 1
        if source is None:  # the usual case, its _counted(address, 0, 1) written out
            source = self._sources[address] = _Source(self._burst, now)
            source.unserved[conn] = None
            source.connections = 1
            ones = self._by_count.get(1)
            if ones is None:
                self._by_count[1] = {address: None}
            else:
                ones[address] = None
            if not self._most:
                self._most = 1
            return None, victim
        source.unserved[conn] = None
        source.connections += 1
        self._counted(address, source.connections - 1, source.connections)
        return None, victim

    def explain(self, refusal: Refusal) -> str:
        """`refusal` in words, for the log."""
        if refusal is Refusal.NOT_ALLOWED:
            return "address outside the allowed networks"
        return f"{self.max_per_ip} connections already open from this address"

    def _victim(self, newcomer: str) -> C:
        """Forget and return the connection that gives way to one from `newcomer`."""
        own = self._sources.get(newcomer)
        if own is not None and own.connections >= self._most:
            address = newcomer
        else:
            address = next(iter(self._by_count[self._most]))
        source = self._sources[address]
        victim = next(iter(source.unserved or source.served))
        self.release(address, victim)
        return victim

    def requested(self, key: str, conn: C, now: float) -> bool:
        """`conn` sent a request: it is now the last of its address to give way. Spends one
        request of the address's rate; False when it is over the limit. `key`: the
        source_of() its address (worked out once per connection)."""
        source = self._sources.get(key)
        if source is None:
            return True
        if source.unserved.pop(conn, False) is None or source.served.pop(conn, False) is None:
            source.served[conn] = None  # to the end
        if not self.rate_per_ip:
            return True
        source.tokens = min(self._burst, source.tokens + (now - source.refilled) * self.rate_per_ip)
        source.refilled = now
        if source.tokens < 1.0:
            return False
        source.tokens -= 1.0
        return True

    def release(self, key: str, conn: C) -> bool:
        """Forget a closed connection (`key`: the source_of() its address); False when it
        was not registered (or already gone)."""
        source = self._sources.get(key)
        if source is None:
            return False
        if source.unserved.pop(conn, False) is False and source.served.pop(conn, False) is False:
            return False
        self.open -= 1
        if source.connections == 1:  # the usual case, its _counted(key, 1, 0) written out
            del self._sources[key]
            ones = self._by_count[1]
            del ones[key]
            if not ones:
                del self._by_count[1]
                if self._most == 1:
                    self._most = 0
            return True
        source.connections -= 1
        self._counted(key, source.connections + 1, source.connections)
        return True

    def _counted(self, address: str, before: int, after: int) -> None:
        """`address` went from `before` connections to `after` (one more or one less)."""
        by_count = self._by_count
        if before:
            bucket = by_count[before]
            del bucket[address]
            if not bucket:
                del by_count[before]
                if before == self._most:  # the one that had the most has one less
                    self._most = after
        if after:
            if after in by_count:
                by_count[after][address] = None
            else:
                by_count[after] = {address: None}
            if after > self._most:
                self._most = after

    def allowed(self, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.allow)

    def connections(self) -> Iterator[C]:
        for source in self._sources.values():
            yield from source.unserved
            yield from source.served
