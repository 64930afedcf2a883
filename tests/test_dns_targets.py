"""Several publication targets: each domain gets its records, a reload adds, changes and
drops targets, and a dropped one has this host's records withdrawn."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace

import dns.message
import dns.name
import pytest
from dns.rdtypes.IN.SRV import SRV

from kmsd.dns import publish
from kmsd.dns.publish import Publisher, PublishSettings
from kmsd.dns.targets import Publications
from tests.conftest import publish_settings

LISTENING = [("192.0.2.1", 1688)]


class Primaries:
    """Every update sent, as (server, zone, update lines); wakes waiters on each."""

    def __init__(self) -> None:
        self.updates: list[tuple[tuple[str, int], str, list[str]]] = []
        self.changed = asyncio.Event()

    async def send(self, msg: dns.message.Message, server: tuple[str, int]) -> None:
        text = dns.message.from_wire(msg.to_wire()).to_text()
        lines = [x for x in text.split(";UPDATE\n")[1].splitlines() if not x.startswith(";")]
        self.updates.append((server, str(msg.question[0].name), lines))
        self.changed.set()

    async def read(self, name: dns.name.Name, server: tuple[str, int]) -> list[SRV]:
        return []

    def publisher(
        self, settings: PublishSettings, listening: Sequence[tuple[str, int]]
    ) -> Publisher:
        return Publisher(settings, listening, send=self.send, read=self.read)

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.updates) < count:
                self.changed.clear()
                await self.changed.wait()


def target(zone: str, server: str, priority: int, weight: int) -> PublishSettings:
    return publish_settings(
        zone,
        server=(server, 53),
        addresses=("192.0.2.1",),
        priority=priority,
        weight=weight,
        ttl=60,
    )


async def test_targets_are_published_changed_dropped_and_withdrawn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(publish, "ADDRESS_POLL", 0.01)
    primaries = Primaries()
    pubs = Publications(LISTENING, factory=primaries.publisher)
    corp, lab = target("corp.test", "127.0.0.1", 0, 10), target("lab.test", "127.0.0.2", 5, 1)
    pubs.apply([corp, lab])
    await primaries.wait_for(2)
    assert sorted((s[0], zone, lines[0]) for s, zone, lines in primaries.updates) == [
        ("127.0.0.1", "corp.test.", "_vlmcs._tcp.corp.test. 60 IN SRV 0 10 1688 kms1.corp.test."),
        ("127.0.0.2", "lab.test.", "_vlmcs._tcp.lab.test. 60 IN SRV 5 1 1688 kms1.lab.test."),
    ]
    assert [t["published"] for t in pubs.state()["targets"]] == [True, True]

    # A reload: corp.test gets another weight (in place), lab.test is dropped.
    pubs.apply([replace(corp, weight=20)])
    await pubs.settled()
    await primaries.wait_for(4)
    after = {zone: lines for _, zone, lines in primaries.updates[2:]}
    assert after["lab.test."] == [
        "_vlmcs._tcp.lab.test. 0 NONE SRV 5 1 1688 kms1.lab.test.",
        "kms1.lab.test. 0 NONE A 192.0.2.1",
    ]
    assert after["corp.test."][0] == "_vlmcs._tcp.corp.test. 0 NONE SRV 0 10 1688 kms1.corp.test."
    assert after["corp.test."][-2] == "_vlmcs._tcp.corp.test. 60 IN SRV 0 20 1688 kms1.corp.test."
    assert list(pubs.publishers) == [corp.zone]

    # Another server for corp.test: withdrawn from the old one, published on the new one.
    moved = replace(corp, server=("127.0.0.3", 53), weight=20)
    pubs.apply([moved])
    await pubs.settled()
    await primaries.wait_for(6)
    assert {(s[0], lines[0].split()[2]) for s, _, lines in primaries.updates[4:]} == {
        ("127.0.0.1", "NONE"),
        ("127.0.0.3", "IN"),
    }
    await pubs.stop()
    server, zone, lines = primaries.updates[-1]
    assert (server[0], zone, lines[0]) == (
        "127.0.0.3",
        "corp.test.",
        "_vlmcs._tcp.corp.test. 0 NONE SRV 0 20 1688 kms1.corp.test.",
    )
    assert pubs.publishers == {}
