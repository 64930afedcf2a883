"""kmsd.dns.publish with a fake primary: what each update adds and deletes, re-publication
on address and settings changes, backoff; and the BIND key file format."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import dns.message
import dns.name
import dns.rdtypes.IN.SRV
import dns.tsig
import pytest

from kmsd.dns import publish
from kmsd.dns.keyfile import KeyFileError, parse_keys, read_key
from kmsd.dns.publish import Publisher, UpdateFailed
from tests.conftest import publish_settings

ZONE = dns.name.from_text("lab.test")
HOST = dns.name.from_text("kms1.lab.test")
PRIMARY = ("127.0.0.1", 53)


class FakePrimary:
    """Records each update as (section text lines); fails the next `failures` updates."""

    def __init__(self, srv: list[str] | None = None) -> None:
        self.updates: list[list[str]] = []
        self.failures: list[UpdateFailed] = []
        self.srv = srv or []
        self.sent = asyncio.Event()

    async def send(self, msg: dns.message.Message, server: tuple[str, int]) -> None:
        assert server == PRIMARY
        self.sent.set()
        if self.failures:
            raise self.failures.pop(0)
        text = dns.message.from_wire(msg.to_wire()).to_text()  # names as on the wire
        section = text.split(";UPDATE\n")[1].splitlines()
        self.updates.append([line for line in section if not line.startswith(";")])

    async def read(
        self, name: dns.name.Name, server: tuple[str, int]
    ) -> list[dns.rdtypes.IN.SRV.SRV]:
        if not self.srv:
            return []
        rrset = dns.rrset.from_text(name, 60, "IN", "SRV", *self.srv)
        return [r for r in rrset if isinstance(r, dns.rdtypes.IN.SRV.SRV)]


def publisher(primary: FakePrimary, address: list[str], **settings: Any) -> Publisher:
    config = publish_settings(server=PRIMARY, **settings)
    return Publisher(
        config,
        [("0.0.0.0", 1688)],
        send=primary.send,
        read=primary.read,
        local_address=lambda server: address[0],
    )


async def test_first_publication_adds_srv_and_address_and_clears_stale_own_srv() -> None:
    primary = FakePrimary(["5 5 1688 kms1.lab.test.", "0 0 1688 other.lab.test."])
    pub = publisher(primary, ["192.0.2.10"], priority=1, weight=20, ttl=120)
    await pub.publish()
    assert primary.updates == [
        [
            "_vlmcs._tcp.lab.test. 0 NONE SRV 5 5 1688 kms1.lab.test.",
            "_vlmcs._tcp.lab.test. 120 IN SRV 1 20 1688 kms1.lab.test.",
            "kms1.lab.test. 120 IN A 192.0.2.10",
        ]
    ]


async def test_address_and_settings_changes_replace_only_what_changed() -> None:
    primary = FakePrimary()
    address = ["192.0.2.10"]
    pub = publisher(primary, address)
    await pub.publish()
    address[0] = "192.0.2.11"
    await pub.publish()
    assert primary.updates[1] == [
        "_vlmcs._tcp.lab.test. 0 NONE SRV 0 0 1688 kms1.lab.test.",
        "kms1.lab.test. 0 NONE A 192.0.2.10",
        "_vlmcs._tcp.lab.test. 600 IN SRV 0 0 1688 kms1.lab.test.",
        "kms1.lab.test. 600 IN A 192.0.2.11",
    ]
    pub.reconfigure(publish_settings(server=PRIMARY, priority=3, weight=4))
    await pub.publish()
    assert primary.updates[2][0] == "_vlmcs._tcp.lab.test. 0 NONE SRV 0 0 1688 kms1.lab.test."
    assert primary.updates[2][2] == "_vlmcs._tcp.lab.test. 600 IN SRV 3 4 1688 kms1.lab.test."
    await pub.withdraw()
    assert primary.updates[3] == [
        "_vlmcs._tcp.lab.test. 0 NONE SRV 3 4 1688 kms1.lab.test.",
        "kms1.lab.test. 0 NONE A 192.0.2.11",
    ]


async def test_a_target_outside_the_zone_gets_no_address_records() -> None:
    primary = FakePrimary()
    config = publish_settings(server=PRIMARY, host=dns.name.from_text("kms.corp.test"))
    pub = Publisher(config, [("192.0.2.5", 1700)], send=primary.send, read=primary.read)
    await pub.publish()
    assert primary.updates == [["_vlmcs._tcp.lab.test. 600 IN SRV 0 0 1700 kms.corp.test."]]


async def test_listening_addresses_are_published_and_wildcards_resolved() -> None:
    primary = FakePrimary()
    config = publish_settings(server=PRIMARY)
    listening = [("127.0.0.2", 1688), ("0.0.0.0", 1688), ("::", 1688)]
    pub = Publisher(config, listening, send=primary.send, local_address=lambda s: "192.0.2.7")
    assert pub.addresses(PRIMARY) == {"127.0.0.2", "192.0.2.7"}  # :: cannot reach an IPv4 primary
    pinned = Publisher(publish_settings(server=PRIMARY, addresses=("2001:db8::1",)), listening)
    assert pinned.addresses(PRIMARY) == {"2001:db8::1"}
    assert pinned.desired(PRIMARY).address_rdatas() == [("AAAA", "2001:db8::1")]


async def test_run_retries_with_backoff_and_republishes_when_the_address_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(publish, "FIRST_BACKOFF", 0.01)
    monkeypatch.setattr(publish, "ADDRESS_POLL", 0.01)
    primary = FakePrimary()
    primary.failures = [UpdateFailed("REFUSED", "no"), UpdateFailed("TIMEOUT", "slow")]
    address = ["192.0.2.10"]
    pub = publisher(primary, address)
    pub.start()
    try:
        async with asyncio.timeout(5):
            while not primary.updates:
                primary.sent.clear()
                await primary.sent.wait()
            assert pub.published is not None
            address[0] = "192.0.2.12"
            while len(primary.updates) < 2:
                primary.sent.clear()
                await primary.sent.wait()
        assert primary.updates[1][-1] == "kms1.lab.test. 600 IN A 192.0.2.12"
    finally:
        await pub.stop()
    assert primary.updates[-1][-1] == "kms1.lab.test. 0 NONE A 192.0.2.12"


async def test_stop_withdraws_an_update_whose_outcome_is_unknown() -> None:
    primary = FakePrimary()
    primary.failures = [UpdateFailed("TIMEOUT", "no answer")]
    pub = publisher(primary, ["192.0.2.10"])
    with pytest.raises(UpdateFailed):
        await pub.publish()
    await pub.withdraw()
    assert primary.updates == [
        [
            "_vlmcs._tcp.lab.test. 0 NONE SRV 0 0 1688 kms1.lab.test.",
            "kms1.lab.test. 0 NONE A 192.0.2.10",
        ]
    ]
    refused = FakePrimary()
    refused.failures = [UpdateFailed("NOTAUTH", "TSIG error BADSIG")]
    pub = publisher(refused, ["192.0.2.10"])
    with pytest.raises(UpdateFailed):
        await pub.publish()
    await pub.withdraw()
    assert refused.updates == []  # the primary refused it: nothing to withdraw


def test_key_file_formats(tmp_path: Path) -> None:
    text = """
    # tsig-keygen -a hmac-sha256 kmsd-key
    key "kmsd-key" {
        algorithm hmac-sha256;
        secret "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTMyYg==";
    };
    /* a second key */
    key other { algorithm HMAC-SHA512; secret "AAAA"; };
    """
    keys = parse_keys(text)
    assert [str(k.name) for k in keys] == ["kmsd-key.", "other."]
    assert keys[0].algorithm == dns.tsig.HMAC_SHA256
    assert keys[0].secret == b"secret-secret-secret-secret-32b"
    assert keys[1].algorithm == dns.tsig.HMAC_SHA512
    (tmp_path / "k.key").write_text(text)
    assert read_key(tmp_path / "k.key").name == dns.name.from_text("kmsd-key")


# Secrets as tsig-keygen may write them, with "//" inside the quoted base64 (about 1 % of
# random 32-byte keys): a comment must not start there.
SLASHES = bytes.fromhex("ffff" + "00" * 28 + "fbff")  # "//8AAA...AA+/8="
LEADING = b"\xff\xff\xff" + bytes(range(29))  # "////AAECAw..."


@pytest.mark.parametrize("secret", [SLASHES, LEADING], ids=["inside", "leading"])
def test_key_file_secret_with_slashes(secret: bytes) -> None:
    encoded = base64.b64encode(secret).decode()
    assert "//" in encoded
    text = f'''key "kmsd-key" {{ // tsig-keygen's layout
\talgorithm hmac-sha256; /* a comment */
\tsecret "{encoded}"; # another
}};
'''
    assert parse_keys(text)[0].secret == secret


def test_key_file_strings_keep_comment_marks() -> None:
    """`/*`, `//` and `#` inside quotes are text; outside, comments (even across lines)."""
    text = """/* key "commented" { algorithm hmac-md5; secret "AAAA"; }; */
    key "lab/*1*/#x//y" { algorithm hmac-sha256; secret "AAAA"; };
    key "b" { algorithm hmac-sha256; secret "AAAA"; }; // key "c" { ...
    """
    assert [k.name.to_text(omit_final_dot=True) for k in parse_keys(text)] == [
        "lab/*1*/#x//y",
        "b",
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('key "k" { algorithm hmac-sha256; secret "AAAA" }', "missing ';'"),
        ('key "k" { algorithm hmac-sha256; secret "AAAA"; ', "missing '}'"),
        ('key "k" { algorithm hmac-sha256; secret "AAAA"; }; }', "unexpected '}'"),
        ('key "k" { secret "AAAA; };', "unexpected '\"'"),
    ],
)
def test_key_file_syntax_errors(text: str, problem: str) -> None:
    with pytest.raises(KeyFileError, match=problem):
        parse_keys(text)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "no key"),
        ('key "k" { algorithm hmac-sha256; };', "secret is missing"),
        ('key "k" { algorithm hmac-sha256; secret "!!"; };', "not base64"),
        ('key "k" { algorithm gss-tsig; secret "AAAA"; };', "algorithm 'gss-tsig'"),
    ],
)
def test_key_file_errors(text: str, problem: str) -> None:
    with pytest.raises(KeyFileError, match=problem):
        parse_keys(text)
    with pytest.raises(KeyFileError, match="cannot read"):
        read_key(Path("/nonexistent/kmsd.key"))
