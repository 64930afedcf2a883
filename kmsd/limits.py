"""Who may connect and how much: allowed networks, connection caps, per-address request rate."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(slots=True)
class _Source:
    connections: int = 0
    tokens: float = 0.0
    refilled: float = 0.0


@dataclass
class Admission:
    """Connection admission and request rate, per source address.

    State is kept only for addresses with an open connection, so it is bounded by
    `max_connections`.
    """

    max_connections: int = 1000
    max_per_ip: int = 256
    allow: tuple[Network, ...] = ()
    rate_per_ip: float = 0.0  # requests per second per address; 0: unlimited
    _sources: dict[str, _Source] = field(default_factory=dict)
    _total: int = 0

    def admit(self, address: str, now: float) -> str | None:
        """Register a new connection from `address`; returns why it is refused, or None."""
        if self.allow and not self.allowed(address):
            return "address outside the allowed networks"
        if self._total >= self.max_connections:
            return f"{self.max_connections} connections already open"
        source = self._sources.get(address)
        if source is None:
            burst = max(1.0, 2 * self.rate_per_ip)
            source = self._sources[address] = _Source(tokens=burst, refilled=now)
        if source.connections >= self.max_per_ip:
            return f"{self.max_per_ip} connections already open from this address"
        source.connections += 1
        self._total += 1
        return None

    def release(self, address: str) -> None:
        source = self._sources.get(address)
        if source is None:
            return
        source.connections -= 1
        self._total -= 1
        if source.connections <= 0:
            del self._sources[address]

    def allowed(self, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.allow)

    def take(self, address: str, now: float) -> bool:
        """Spend one request of `address`'s rate; False when it is over the limit."""
        if not self.rate_per_ip:
            return True
        source = self._sources.get(address)
        if source is None:
            return True
        burst = max(1.0, 2 * self.rate_per_ip)
        source.tokens = min(burst, source.tokens + (now - source.refilled) * self.rate_per_ip)
        source.refilled = now
        if source.tokens < 1.0:
            return False
        source.tokens -= 1.0
        return True

    @property
    def open(self) -> int:
        return self._total
