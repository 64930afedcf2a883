"""Several publication targets: each domain gets its records, a reload adds, changes and
drops targets, and a dropped one has this host's records withdrawn."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import dns.message
import dns.name
import pytest
from dns.rdtypes.IN.SRV import SRV

from kmsd import config
from kmsd.cli import build_parser
from kmsd.dns import publish
from kmsd.dns.publish import Publisher, PublishSettings
from kmsd.dns.targets import Publications
from tests.conftest import publish_settings, run_kmsd
from tests.test_dns_gss import make_keytab

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
    state = pubs.state()
    assert state is not None and [t["published"] for t in state["targets"]] == [True, True]

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


def test_targets_from_a_file_a_line_and_the_short_form(tmp_path: Path) -> None:
    file = tmp_path / "kmsd.toml"
    file.write_text(
        """[dns]
publish_zone = "lab.test"
publish_server = "127.0.0.1:5300"

[[dns.publish_target]]
zone = "corp.test"
server = "127.0.0.1:5301"
host = "kms9.corp.test"
address = ["192.0.2.9", "2001:db8::9"]
priority = 10
weight = 3
ttl = 30
"""
    )
    given = vars(
        build_parser().parse_args(
            ["--config", str(file), "--publish-target", "edu.test server=127.0.0.1 weight=2"]
        )
    )
    effective, settings = config.load(given, {})
    assert [(s.zone.to_text(), s.server, s.priority, s.weight) for s in settings.dns] == [
        ("lab.test.", ("127.0.0.1", 5300), 0, 0),
        ("edu.test.", ("127.0.0.1", 53), 0, 2),  # the command line replaces the file's list
    ]
    effective, settings = config.load(vars(build_parser().parse_args(["--config", str(file)])), {})
    corp = settings.dns[1]
    assert (corp.host.to_text(), corp.addresses, corp.ttl) == (
        "kms9.corp.test.",
        ("192.0.2.9", "2001:db8::9"),
        30,
    )
    # check-config's output reads back as the same configuration.
    again = tmp_path / "again.toml"
    again.write_text(config.render(effective))
    _, reread = config.load(vars(build_parser().parse_args(["--config", str(again)])), {})
    assert reread.dns == settings.dns


@pytest.mark.system
@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["--publish-target", "corp.test colour=blue"], "unknown key 'colour'"),
        (["--publish-target", "corp.test server"], "'server' is not key=value"),
        (["--publish-target", "corp.test weight=70000"], "'70000' must be between 0 and 65535"),
        (
            ["--publish-target", "corp.test key=/k keytab=/kt"],
            "key \\(TSIG\\) and keytab/principal/ccache/service \\(GSS-TSIG\\) exclude",
        ),
        (
            ["--publish-zone", "corp.test", "--publish-target", "corp.test"],
            "corp.test: more than one publication target",
        ),
        (
            ["--publish-zone", "corp.test", "--publish-key", "/k", "--publish-principal", "K$"],
            "dns.publish_key \\(TSIG\\) and dns.publish_keytab",
        ),
    ],
)
def test_bad_targets_are_configuration_errors(argv: list[str], problem: str) -> None:
    result = run_kmsd("check-config", *argv)
    assert result.returncode == 2
    assert re.search(problem, result.stderr), result.stderr


@pytest.mark.system
@pytest.mark.skipif(not shutil.which("ktutil"), reason="krb5-user is not installed")
def test_check_config_checks_the_keytab_and_its_principal(tmp_path: Path) -> None:
    pytest.importorskip("gssapi")
    keytab = make_keytab(tmp_path / "kms.keytab", "KMS1$@LAB.TEST")
    target = f"lab.test keytab={keytab} principal=KMS1$@LAB.TEST"
    assert run_kmsd("check-config", "--publish-target", target).returncode == 0
    result = run_kmsd("check-config", "--publish-target", target.replace("KMS1", "KMS2"))
    assert result.returncode == 2
    assert f"dns.publish_target lab.test: keytab {keytab} holds no key for KMS2$" in result.stderr
    result = run_kmsd(
        "check-config", "--publish-zone", "lab.test", "--publish-keytab", str(tmp_path / "no")
    )
    assert "dns.publish_keytab: keytab" in result.stderr and "cannot read" in result.stderr
