"""systemd integration without a library: sd_notify(3) messages and socket activation.

notify() writes READY=1, STATUS=..., STOPPING=1, WATCHDOG=1 ... as one datagram to
$NOTIFY_SOCKET (a path, or '@name' in the abstract namespace); without that variable it
does nothing. listen_sockets() takes the listening sockets systemd passed (LISTEN_FDS,
sd_listen_fds(3)): file descriptors 3, 4, ... when LISTEN_PID is this process.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, MutableMapping

import structlog

log = structlog.get_logger("kmsd")

LISTEN_FDS_START = 3


def notify(state: str, environ: MutableMapping[str, str] = os.environ) -> bool:
    """Send `state` (lines of KEY=VALUE) to the service manager; False when there is none
    or the message could not be sent (never raises: kmsd runs on without systemd)."""
    address = environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), target)
    except OSError as exc:
        log.warning("cannot notify systemd", socket=address, error=str(exc))
        return False
    return True


def watchdog_interval(environ: MutableMapping[str, str] = os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), None when not asked."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


async def watchdog(interval: float, send: Callable[[str], object] = notify) -> None:
    """Ping the watchdog from the event loop until cancelled: a stuck loop stops the pings
    and systemd restarts kmsd."""
    while True:
        send("WATCHDOG=1")
        await asyncio.sleep(interval)


def start_watchdog(environ: MutableMapping[str, str] = os.environ) -> asyncio.Task[None] | None:
    """The watchdog pinger when systemd asked for one (WatchdogSec=), else None."""
    interval = watchdog_interval(environ)
    if interval is None:
        return None
    log.debug("systemd watchdog", interval=interval)
    return asyncio.create_task(watchdog(interval))


class ActivationError(Exception):
    """Sockets passed by systemd that kmsd cannot serve."""


def listen_sockets(environ: MutableMapping[str, str] = os.environ) -> list[socket.socket]:
    """The listening TCP sockets passed by socket activation (empty when there are none).

    Like sd_listen_fds(unset_environment=1): the variables are removed so that they do not
    leak into child processes, and the descriptors are made close-on-exec."""
    count, pid = environ.get("LISTEN_FDS", ""), environ.get("LISTEN_PID", "")
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        environ.pop(name, None)
    if not count or pid != str(os.getpid()):
        return []
    if not count.isdigit():
        raise ActivationError(f"LISTEN_FDS={count!r} is not a number")
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ActivationError(f"inherited descriptor {fd}: {exc.strerror}") from None
        tcp = sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
        if not tcp or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.detach()
            raise ActivationError(
                f"inherited descriptor {fd} is not a listening TCP socket "
                "(kmsd.socket needs ListenStream=, Accept=no)"
            )
        sock.setblocking(False)
        sockets.append(sock)
    return sockets
