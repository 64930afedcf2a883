"""Where to send requests: HOST[:PORT] as typed, and the loopback rule of `load`.

kmsclient.discovery produces the same Target from DNS SRV records; nothing here knows DNS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

DEFAULT_PORT = 1688


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_target(text: str) -> Target:
    """HOST, HOST:PORT, IPv6, or [IPv6]:PORT; raises ValueError."""
    host, port = text, str(DEFAULT_PORT)
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] not in ("", ":"):
            raise ValueError(f"{text!r}: expected [IPv6] or [IPv6]:PORT")
        host, port = text[1:end], text[end + 2 :] or port
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host:
        raise ValueError(f"{text!r}: no host")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: port must be 1-65535")
    return Target(host, int(port))


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
