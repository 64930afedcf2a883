"""`kmsd dns-check`: one authenticated update that changes nothing, against each publication
target, and a line per target saying whether kmsd could publish there.

The update carries only a prerequisite (the zone's apex exists) and no change, so it tests
the way to the server, the credentials (TSIG key, or the Kerberos ticket and the GSS-TSIG
context) and the server's acceptance of signed updates, and leaves the zone as it was.
Whether the server lets this principal own the `_vlmcs._tcp` names shows at publication.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

import dns.tsig
import dns.update

from ..addresses import join_host_port
from .publish import Publisher, PublishSettings, UpdateFailed, primary_of, send_update


@dataclass(frozen=True)
class Outcome:
    zone: str
    server: str | None
    credentials: str
    ok: bool
    detail: str

    def line(self) -> str:
        status = "ok" if self.ok else "FAILED"
        where = self.server or "no server"
        return f"{self.zone} at {where} ({self.credentials}): {status}: {self.detail}"


def noop_update(settings: PublishSettings, key: dns.tsig.Key | None) -> dns.update.UpdateMessage:
    """An update whose only content is the prerequisite that the zone's apex is in use."""
    update = dns.update.UpdateMessage(settings.zone)
    update.present(settings.zone)
    if key is not None:
        update.use_tsig(key)
    return update


async def check_target(settings: PublishSettings, timeout: float = 10.0) -> Outcome:
    zone = settings.zone.to_text(True)
    credentials = settings.credentials()
    server = settings.server
    try:
        async with asyncio.timeout(timeout):
            if server is None:
                server = await primary_of(settings.zone)
            publisher = Publisher(settings, [])
            key = await publisher.signing_key(server)
            await send_update(noop_update(settings, key), server)
    except UpdateFailed as exc:
        detail = f"{exc.rcode}: {exc.detail}"
    except TimeoutError:
        detail = f"TIMEOUT: no result within {timeout:g} s"
    else:
        how = "signed update accepted" if key is not None else "unsigned update accepted"
        return Outcome(zone, _where(server), credentials, True, f"{how} (nothing changed)")
    return Outcome(zone, _where(server), credentials, False, detail)


def _where(server: tuple[str, int] | None) -> str | None:
    return None if server is None else join_host_port(*server)


async def check_all(targets: Sequence[PublishSettings]) -> list[Outcome]:
    """Every target at once; one outcome each, in the targets' order."""
    return list(await asyncio.gather(*(check_target(t) for t in targets)))


def run(targets: Sequence[PublishSettings], out: TextIO) -> int:
    """Check every target, print a line each: 0 when all are fine, 1 otherwise, 2 when
    there is nothing to check."""
    if not targets:
        out.write("no DNS publication configured ([dns] publish_zone or publish_target)\n")
        return 2
    outcomes = asyncio.run(check_all(targets))
    for outcome in outcomes:
        out.write(outcome.line() + "\n")
    return 0 if all(o.ok for o in outcomes) else 1
