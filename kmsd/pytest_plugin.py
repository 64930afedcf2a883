"""pytest fixtures for testing activation tooling against a real kmsd host.

Installed with kmsd and found by pytest through the `pytest11` entry point (nothing to
import or configure). Importing this module costs next to nothing: kmsd itself is
imported when a test first asks for a fixture.

kms_host
    A KmsTestHost (kmsd.testing) of its own for the test: on 127.0.0.1, an ephemeral port,
    an in-memory table, a virtual clock.
kms_hosts
    Several hosts, for failover: `primary, backup = kms_hosts(2)`. The hosts live for the
    whole session (started when first asked for) and are reset for each test that asks.
kms_dns
    kmsd's DNS responder advertising hosts as `_vlmcs._tcp.<zone>` SRV records:
    `dns = kms_dns(primary, backup)`; point the tool at dns.nameserver, domain dns.zone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from kmsd.testing import KmsDns, KmsTestHost


@pytest.fixture
def kms_host() -> Iterator[KmsTestHost]:
    """A kmsd host for this test alone."""
    from kmsd.testing import KmsTestHost

    with KmsTestHost() as host:
        yield host


class HostPool:
    """Hosts shared by the tests of a session; each call resets the hosts it returns."""

    def __init__(self) -> None:
        self.hosts: list[KmsTestHost] = []

    def __call__(self, count: int = 2) -> list[KmsTestHost]:
        from kmsd.testing import KmsTestHost

        while len(self.hosts) < count:
            self.hosts.append(KmsTestHost().start())
        chosen = self.hosts[:count]
        for host in chosen:
            host.reset()
        return chosen

    def stop(self) -> None:
        for host in self.hosts:
            host.stop()
        self.hosts.clear()


@pytest.fixture(scope="session")
def kms_host_pool() -> Iterator[HostPool]:
    pool = HostPool()
    yield pool
    pool.stop()


@pytest.fixture
def kms_hosts(kms_host_pool: HostPool) -> Callable[[int], list[KmsTestHost]]:
    """kms_hosts(n): n session-wide hosts, reset for this test."""
    return kms_host_pool


@pytest.fixture
def kms_dns() -> Iterator[Callable[..., KmsDns]]:
    """kms_dns(*hosts, zone="kms.test", priorities=None): a DNS responder for this test."""
    from kmsd.testing import KmsDns

    started: list[KmsDns] = []

    def make(
        *hosts: KmsTestHost, zone: str = "kms.test", priorities: Sequence[int] | None = None
    ) -> KmsDns:
        dns = KmsDns(hosts, zone, priorities).start()
        started.append(dns)
        return dns

    yield make
    for dns in started:
        dns.stop()
