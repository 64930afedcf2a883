"""HOST:PORT as people type it, and back: one parser for listen addresses, targets and
nameservers alike."""

from __future__ import annotations

import ipaddress
import re

_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOST_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")


def split_host_port(text: str, default_port: int, *, min_port: int = 1) -> tuple[str, int]:
    """HOST, HOST:PORT, a bare IPv6 address, [IPv6] or [IPv6]:PORT; raises ValueError.
    The host may be empty (":PORT"); callers decide what that means."""
    host, port = text, str(default_port)
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] not in ("", ":"):
            raise ValueError(f"{text!r}: expected [IPv6] or [IPv6]:PORT")
        host, port = text[1:end], text[end + 2 :] or port
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not port.isdigit() or not min_port <= int(port) <= 65535:
        raise ValueError(f"{text!r}: port must be {min_port}-65535")
    return host, int(port)


def parse_bind_address(text: str, default_port: int) -> tuple[str, int]:
    """A local address to listen on: HOST:PORT, [IPv6]:PORT, HOST alone (`default_port`) or
    :PORT (every IPv4 address); port 0 lets the system choose."""
    host, port = split_host_port(text, default_port, min_port=0)
    if host and not is_ip(host) and not _HOST_NAME.fullmatch(host):
        raise ValueError(f"{text!r}: {host!r} is neither an IP address nor a host name")
    return host or "0.0.0.0", port


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_ip_port(text: str, default_port: int, what: str) -> tuple[str, int]:
    """An IP address with an optional port, for servers named by address only."""
    host, port = split_host_port(text, default_port)
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        raise ValueError(f"{text!r}: {what} is given by its IP address") from None


def is_ip(host: str) -> bool:
    """An IPv4 or IPv6 address (not a name)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
