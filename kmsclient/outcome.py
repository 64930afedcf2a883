"""How an exchange ended: the documented exit statuses and the mapping of errors onto them."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from enum import IntEnum

from kmsd.protocol.client import HostRefused, RpcError
from kmsd.protocol.errors import KmsError, NotGenuine


class Status(IntEnum):
    """Exit statuses of `kmsclient` (README.md, "kmsclient")."""

    ACTIVATED = 0
    ERROR = 1  # the client itself failed (a bug); Python's status for an uncaught exception
    USAGE = 2  # bad command line (argparse's status)
    BELOW_THRESHOLD = 3  # a genuine reply whose count is below the N policy (0xC004F038)
    REFUSED = 4  # the host answered with an HRESULT, a fault or a bind_nak
    UNREACHABLE = 5  # no usable answer: refused, timed out, closed (0xC004F074)
    NOT_GENUINE = 6  # a reply failed verification; `check` names the failed check

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Failure:
    """Why an exchange did not produce a verified reply."""

    status: Status
    kind: str  # short and stable: "timeout", "hresult", "not genuine: hmac", ...
    message: str  # for a person
    hresult: int | None = None
    check: str | None = None


def classify(exc: BaseException, timeout: float) -> Failure:
    """The failure an exception from a connection or an exchange stands for."""
    if isinstance(exc, NotGenuine):
        return Failure(Status.NOT_GENUINE, f"not genuine: {exc.check}", str(exc), check=exc.check)
    if isinstance(exc, HostRefused):
        return Failure(Status.REFUSED, "hresult", exc.reason, hresult=exc.status)
    if isinstance(exc, KmsError):
        return Failure(Status.REFUSED, "hresult", exc.reason, hresult=int(exc.hresult))
    if isinstance(exc, RpcError):
        return Failure(Status.REFUSED, "rpc", str(exc))
    if isinstance(exc, TimeoutError):
        return Failure(Status.UNREACHABLE, "timeout", f"no answer within {timeout:g} s")
    if isinstance(exc, asyncio.IncompleteReadError):
        if exc.partial:
            got, want = len(exc.partial), exc.expected
            message = f"the host closed the connection in the middle of a reply ({got} of"
            return Failure(Status.UNREACHABLE, "closed", f"{message} {want} bytes)")
        return Failure(
            Status.UNREACHABLE, "closed", "the host closed the connection without answering"
        )
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return Failure(
            Status.UNREACHABLE, "closed", "the host closed the connection (reset) without answering"
        )
    if isinstance(exc, ConnectionRefusedError):
        message = "connection refused: nothing listens there"
        return Failure(Status.UNREACHABLE, "no listener", message)
    if isinstance(exc, socket.gaierror):
        return Failure(Status.UNREACHABLE, "resolve", f"cannot resolve the host: {exc.strerror}")
    if isinstance(exc, OSError):
        detail = exc.strerror or str(exc) or type(exc).__name__
        return Failure(Status.UNREACHABLE, "network", f"network error: {detail}")
    raise exc
