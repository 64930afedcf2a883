"""Several publication targets at once, like a KMS host's DnsDomainPublishList: one
Publisher per domain, each with its own server, credentials, priority, weight and TTL.

A reload hands over the new list: new domains are published, dropped ones have this host's
records withdrawn, and changed ones are re-published (withdrawn from where they were first
when the server, credentials or host name changed). dnspython is imported only once there
is something to publish.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    import dns.name

    from .publish import Publisher, PublishSettings

log = structlog.get_logger("kmsd")

PublisherFactory = Callable[["PublishSettings", Sequence[tuple[str, int]]], "Publisher"]


def _default_factory(settings: PublishSettings, listening: Sequence[tuple[str, int]]) -> Publisher:
    from .publish import Publisher

    return Publisher(settings, listening)


def _same_place(a: PublishSettings, b: PublishSettings) -> bool:
    """Whether `b` can take over `a`'s records in place (only SRV data or timing changed)."""
    return (a.zone, a.host, a.server, a.key, a.gss) == (b.zone, b.host, b.server, b.key, b.gss)


class Publications:
    """The publishers of every target, keyed by domain."""

    def __init__(
        self,
        listening: Sequence[tuple[str, int]],
        *,
        factory: PublisherFactory = _default_factory,
    ) -> None:
        self.listening = tuple(listening)
        self.factory = factory
        self.publishers: dict[dns.name.Name, Publisher] = {}
        self._leaving: set[asyncio.Task[None]] = set()

    def apply(self, targets: Sequence[PublishSettings]) -> None:
        """Publish to exactly `targets` from now on (withdrawals run in the background)."""
        wanted = {t.zone: t for t in targets}
        for zone, publisher in list(self.publishers.items()):
            target = wanted.get(zone)
            if target is None or not _same_place(publisher.settings, target):
                del self.publishers[zone]
                self._retire(publisher, "removed" if target is None else "moved")
        for zone, target in wanted.items():
            running = self.publishers.get(zone)
            if running is not None:
                if running.settings != target:
                    running.reconfigure(target)
                continue
            log.info("dns target added", zone=str(zone))
            self.publishers[zone] = self.factory(target, self.listening)
            self.publishers[zone].start()

    def _retire(self, publisher: Publisher, why: str) -> None:
        log.info("dns target " + why, zone=str(publisher.settings.zone))
        task = asyncio.create_task(publisher.stop())
        self._leaving.add(task)
        task.add_done_callback(self._leaving.discard)

    async def settled(self) -> None:
        """Wait for the withdrawals of dropped targets."""
        while self._leaving:
            await asyncio.gather(*self._leaving, return_exceptions=True)

    async def stop(self) -> None:
        """Withdraw from every target at once (each bounded by its own timeouts)."""
        publishers, self.publishers = list(self.publishers.values()), {}
        await asyncio.gather(*(p.stop() for p in publishers), return_exceptions=True)
        await self.settled()

    def state(self) -> dict[str, Any] | None:
        """The first target's state and every target's (for the admin endpoint and
        metrics); None when nothing is published."""
        targets = [p.state() for p in self.publishers.values()]
        return {**targets[0], "targets": targets} if targets else None
