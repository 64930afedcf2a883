"""Where to send requests: HOST[:PORT] as typed, and the loopback rule of `load`.

kmsclient.discovery produces the same Target from DNS SRV records; nothing here knows DNS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

from kmsd.addresses import join_host_port, split_host_port
from kmsd.protocol.constants import KMS_PORT


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int = KMS_PORT

    def __str__(self) -> str:
        return join_host_port(self.host, self.port)


def parse_target(text: str) -> Target:
    """HOST, HOST:PORT, IPv6, or [IPv6]:PORT; raises ValueError."""
    host, port = split_host_port(text, KMS_PORT)
    if not host:
        raise ValueError(f"{text!r}: no host")
    return Target(host, port)


async def loopback_only(target: Target) -> None:
    """Raise ValueError unless every address `target` resolves to is a loopback address."""
    try:
        addresses = [ipaddress.ip_address(target.host)]
    except ValueError:
        infos = await asyncio.get_running_loop().getaddrinfo(
            target.host, target.port, type=socket.SOCK_STREAM
        )
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    outside = sorted({str(a) for a in addresses if not a.is_loopback})
    if outside or not addresses:
        where = ", ".join(outside) or "nothing"
        if where != target.host:
            where = f"{target.host} resolves to {where}"
        raise ValueError(
            f"load generation is only allowed against loopback addresses; {where} is not"
        )
