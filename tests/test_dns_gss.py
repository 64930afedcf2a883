"""GSS-TSIG without Kerberos: the TKEY exchange, context renewal and both ways a server may
sign its answers, with a stand-in GSS-API context (an HMAC) and a stand-in DNS server."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import shutil
import subprocess
from pathlib import Path

import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TKEY
import dns.rrset
import dns.tsig
import dns.update
import pytest
from dns.rdtypes.IN.SRV import SRV

from kmsd.dns import gss
from kmsd.dns.gss import GssCredentials, GssError, GssSigner, reason_of
from kmsd.dns.publish import Publisher, UpdateFailed, read_answer
from tests.conftest import publish_settings

SERVER = ("127.0.0.1", 53)
ZONE = dns.name.from_text("lab.test")


class FakeContext:
    """Both ends of a GSS-API context: one round trip, MICs are HMACs of a shared secret."""

    def __init__(self, secret: bytes = b"shared", *, fail: str | None = None) -> None:
        self.secret = secret
        self.fail = fail
        self.complete = False
        self.steps: list[bytes | None] = []

    def step(self, token: bytes | None) -> bytes | None:
        self.steps.append(token)
        if self.fail:
            raise GssError(reason_of(self.fail), self.fail)
        if token is None:
            return b"client-hello"
        assert token == b"server-hello"
        self.complete = True
        return None

    def expires(self, now: float) -> float:
        return now + 3600

    def get_signature(self, data: bytes) -> bytes:
        return hmac.new(self.secret, data, hashlib.sha256).digest()

    def verify_signature(self, data: bytes, signature: bytes) -> None:
        if not hmac.compare_digest(self.get_signature(data), signature):
            raise ValueError("bad MIC")


class Prefixing:
    """A server context that signs the way Samba does (request MAC without its length)."""

    def __init__(self, context: FakeContext, request_mac: bytes) -> None:
        self.context, self.request_mac = context, request_mac

    def get_signature(self, data: bytes) -> bytes:
        return self.context.get_signature(self.request_mac + data)


class FakeServer:
    """Answers TKEY queries like a GSS-TSIG server; counts them."""

    def __init__(self, *, rcode: int = dns.rcode.NOERROR, sign_with: bytes = b"shared") -> None:
        self.tkeys = 0
        self.rcode = rcode
        self.sign_with = sign_with

    async def exchange(self, msg: dns.message.Message, server: tuple[str, int]) -> bytes:
        query = dns.message.from_wire(msg.to_wire())
        assert query.question[0].rdtype == dns.rdatatype.TKEY
        self.tkeys += 1
        offer = query.additional[0][0]
        assert isinstance(offer, dns.rdtypes.ANY.TKEY.TKEY)
        assert (offer.mode, offer.key) == (gss.TKEY_MODE_GSSAPI, b"client-hello")
        name = query.question[0].name
        reply = dns.message.make_response(query)
        reply.set_rcode(dns.rcode.Rcode(self.rcode))
        answer = dns.rdtypes.ANY.TKEY.TKEY(  # type: ignore[no-untyped-call]
            dns.rdataclass.ANY,
            dns.rdatatype.TKEY,
            dns.tsig.GSS_TSIG,
            offer.inception,
            offer.expiration,
            gss.TKEY_MODE_GSSAPI,
            0,
            b"server-hello",
        )
        reply.answer.append(dns.rrset.from_rdata(name, 0, answer))
        reply.use_tsig(dns.tsig.Key(name, FakeContext(self.sign_with), dns.tsig.GSS_TSIG))  # type: ignore[arg-type]
        return reply.to_wire()


def signer(clock: list[float], contexts: list[FakeContext]) -> GssSigner:
    def make(creds: GssCredentials, service: str) -> FakeContext:
        assert service == "DNS@dc1.lab.test"
        contexts.append(FakeContext())
        return contexts[-1]

    return GssSigner(GssCredentials("KMS1$@LAB.TEST"), context=make, clock=lambda: clock[0])


async def test_tkey_exchange_gives_a_key_that_is_reused_then_renewed_before_expiry() -> None:
    server, clock = FakeServer(), [1000.0]
    contexts: list[FakeContext] = []
    sign = signer(clock, contexts)
    key = await sign.signing_key(SERVER, "DNS@dc1.lab.test", server.exchange)
    assert key.algorithm == dns.tsig.GSS_TSIG
    assert key.name.labels[1:] == (b"sig-kmsd", b"")  # not under the zone: never compressed
    assert contexts[0].steps == [None, b"server-hello"]
    assert await sign.signing_key(SERVER, "DNS@dc1.lab.test", server.exchange) is key
    clock[0] += 3600 - gss.RENEW_MARGIN  # the ticket is about to expire
    renewed = await sign.signing_key(SERVER, "DNS@dc1.lab.test", server.exchange)
    assert renewed is not key and renewed.name != key.name
    sign.forget()  # e.g. the server answered NOTAUTH
    assert await sign.signing_key(SERVER, "DNS@dc1.lab.test", server.exchange) is not renewed
    assert server.tkeys == 3


async def test_a_tkey_answer_signed_with_another_context_is_rejected() -> None:
    sign = signer([0.0], [])
    with pytest.raises(GssError, match="server not authenticated"):
        await sign.signing_key(SERVER, "DNS@dc1.lab.test", FakeServer(sign_with=b"x").exchange)
    assert sign.key is None


async def test_a_refused_tkey_says_so() -> None:
    sign = signer([0.0], [])
    server = FakeServer(rcode=dns.rcode.REFUSED)
    with pytest.raises(GssError, match="TKEY refused: the server answered REFUSED"):
        await sign.signing_key(SERVER, "DNS@dc1.lab.test", server.exchange)


def signed_update(context: FakeContext) -> dns.update.UpdateMessage:
    update = dns.update.UpdateMessage(ZONE)
    update.add("_vlmcs._tcp", 60, "SRV", "0 0 1688 kms1.lab.test.")
    key = dns.tsig.Key("k.sig-kmsd.", context, dns.tsig.GSS_TSIG)  # type: ignore[arg-type]
    update.use_tsig(key)
    update.to_wire()  # signs, and keeps the MAC
    return update


@pytest.mark.parametrize("samba", [False, True])
def test_answers_signed_the_standard_or_the_samba_way_are_accepted(samba: bool) -> None:
    context = FakeContext()
    update = signed_update(context)
    assert update.mac
    reply = dns.message.make_response(update)
    if samba:
        key = dns.tsig.Key(update.keyring.name, Prefixing(context, update.mac), dns.tsig.GSS_TSIG)  # type: ignore[arg-type]
        reply.use_tsig(key)
        reply.request_mac = b""
    assert read_answer(reply.to_wire(), update).rcode() == dns.rcode.NOERROR


def test_an_answer_with_a_wrong_signature_is_refused() -> None:
    update = signed_update(FakeContext())
    reply = dns.message.make_response(update)
    assert isinstance(update.keyring, dns.tsig.Key)
    reply.use_tsig(dns.tsig.Key(update.keyring.name, FakeContext(b"other"), dns.tsig.GSS_TSIG))  # type: ignore[arg-type]
    with pytest.raises(UpdateFailed, match="bad TSIG signature"):
        read_answer(reply.to_wire(), update)


def test_a_refusal_carrying_the_request_mac_is_believed_but_not_an_acceptance() -> None:
    """Samba's answer to an update it refuses carries the request's own MAC."""
    update = signed_update(FakeContext())
    assert isinstance(update.keyring, dns.tsig.Key) and update.mac
    for rcode in (dns.rcode.SERVFAIL, dns.rcode.NOERROR):
        reply = dns.message.make_response(dns.update.UpdateMessage(ZONE, id=update.id))
        reply.set_rcode(rcode)
        wire = reply.to_wire()
        tsig = update.tsig[0].replace(mac=update.mac)  # type: ignore[index]
        echoed = dns.message.from_wire(wire)
        echoed.additional.append(dns.rrset.from_rdata(update.keyring.name, 0, tsig))
        raw = echoed.to_wire()
        with pytest.raises(UpdateFailed) as failed:
            read_answer(raw, update)
        if rcode == dns.rcode.SERVFAIL:
            assert failed.value.rcode == "SERVFAIL"
            assert "refused by the server's policy" in failed.value.detail
            assert "signature does not verify" in failed.value.detail
        else:
            assert (failed.value.rcode, failed.value.detail) == (
                "NOTAUTH",
                "the primary's answer has a bad TSIG signature",
            )


def test_an_unsigned_refusal_of_a_signed_update_is_read() -> None:
    update = signed_update(FakeContext())
    reply = dns.message.make_response(dns.update.UpdateMessage(ZONE, id=update.id))
    reply.set_rcode(dns.rcode.REFUSED)
    assert read_answer(reply.to_wire(), update).rcode() == dns.rcode.REFUSED


def test_hmac_answers_are_not_read_the_samba_way() -> None:
    key = dns.tsig.Key("kmsd-key.", b"0123456789abcdef", dns.tsig.HMAC_SHA256)
    update = dns.update.UpdateMessage(ZONE)
    update.use_tsig(key)
    update.to_wire()
    reply = dns.message.make_response(update)
    reply.request_mac = b""  # the Samba way
    with pytest.raises(UpdateFailed, match="bad TSIG signature"):
        read_answer(reply.to_wire(), update)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (
            "Major (851968): Unspecified GSS failure. Minor (2529624869): Clock skew too great",
            "clock skew",
        ),
        (
            "Minor (2529639053): No Kerberos credentials available (default cache: FILE:/tmp/x)",
            "no ticket",
        ),
        ("Minor (2529638919): Key table entry not found", "principal not in keytab"),
        ("Minor (2529639068): Cannot contact any KDC for realm 'LAB.TEST'", "KDC unreachable"),
        ("Minor (2529638918): Server not found in Kerberos database", "unknown principal"),
        ("Minor (2529638936): Preauthentication failed", "wrong password or key"),
        (
            "Major (458752): No credentials were supplied, or the credentials were unavailable "
            "or inaccessible, Minor (2529638936): Preauthentication failed",
            "wrong password or key",
        ),
        ("Major (458752): No credentials were supplied, or the credentials were", "no ticket"),
        ("Major (65536): something new", "GSS-API error"),
    ],
)
def test_kerberos_errors_are_named_for_operators(message: str, reason: str) -> None:
    assert reason_of(message) == reason


async def test_a_publisher_reports_a_failed_context_and_sends_nothing() -> None:
    sent: list[dns.message.Message] = []

    async def send(msg: dns.message.Message, server: tuple[str, int]) -> None:
        sent.append(msg)

    settings = publish_settings(
        server=SERVER,
        gss=GssCredentials("KMS1$@LAB.TEST", service="DNS@dc1.lab.test"),
        addresses=("192.0.2.1",),
    )

    async def read(name: dns.name.Name, server: tuple[str, int]) -> list[SRV]:
        return []

    pub = Publisher(
        settings, [("192.0.2.1", 1688)], send=send, read=read, exchange=FakeServer().exchange
    )

    def failing(creds: GssCredentials, service: str) -> FakeContext:
        return FakeContext(fail="Minor (2529624869): Clock skew too great")

    pub.gss = GssSigner(settings.gss, context=failing)  # type: ignore[arg-type]
    with pytest.raises(UpdateFailed) as failed:
        await pub.publish()
    assert failed.value.rcode == "GSSAPI"
    assert failed.value.detail.startswith("clock skew: ")
    assert sent == []
    pub.gss = GssSigner(settings.gss, context=lambda c, s: FakeContext())  # type: ignore[arg-type]
    server = FakeServer()
    pub.exchange = server.exchange
    await pub.publish()
    assert len(sent) == 1 and sent[0].keyring.algorithm == dns.tsig.GSS_TSIG
    first_key = sent[0].keyring

    # The server no longer knows the key (it restarted): NOTAUTH, then a new context.
    async def refuse(msg: dns.message.Message, server: tuple[str, int]) -> None:
        raise UpdateFailed("NOTAUTH", "TSIG error BADKEY")

    pub.send = refuse
    pub.published = None
    with pytest.raises(UpdateFailed):
        await pub.publish()
    pub.send = send
    await pub.publish()
    assert server.tkeys == 2
    assert sent[-1].keyring.name != first_key.name


def make_keytab(path: Path, *principals: str) -> Path:
    script = "".join(
        f"addent -password -p {p} -k 1 -e aes256-cts-hmac-sha1-96\nsecret\n" for p in principals
    )
    subprocess.run(
        ["ktutil"],
        input=f"{script}wkt {path}\nquit\n",
        text=True,
        check=True,
        capture_output=True,
        timeout=10,
    )
    return path


@pytest.mark.skipif(not shutil.which("ktutil"), reason="krb5-user is not installed")
def test_keytab_check_reads_the_file_and_finds_the_principal(tmp_path: Path) -> None:
    keytab = make_keytab(tmp_path / "kms.keytab", "KMS1$@LAB.TEST", "host/kms1.lab.test@LAB.TEST")
    assert gss.keytab_principals(keytab) == ["KMS1$@LAB.TEST", "host/kms1.lab.test@LAB.TEST"]
    gss.check_keytab(keytab, "KMS1$@LAB.TEST")
    gss.check_keytab(keytab, "KMS1$")  # any realm
    gss.check_keytab(keytab, None)
    with pytest.raises(ValueError, match=r"holds no key for KMS2\$@LAB.TEST \(it holds KMS1"):
        gss.check_keytab(keytab, "KMS2$@LAB.TEST")
    with pytest.raises(ValueError, match="cannot read"):
        gss.check_keytab(tmp_path / "missing.keytab", None)
    (tmp_path / "junk.keytab").write_bytes(b"not a keytab")
    with pytest.raises(ValueError, match=r"junk\.keytab"):
        gss.check_keytab(tmp_path / "junk.keytab", None)


def test_no_ticket_in_the_credential_cache_is_named(tmp_path: Path) -> None:
    """With the real binding: an empty credential cache fails before anything is sent."""
    pytest.importorskip("gssapi")
    creds = GssCredentials("KMS1$@LAB.TEST", ccache=f"FILE:{tmp_path / 'none'}")
    sign = GssSigner(creds)
    server = FakeServer()
    with pytest.raises(GssError) as failed:
        asyncio.run(sign.signing_key(SERVER, "DNS@dc1.lab.test", server.exchange))
    assert failed.value.reason == "no ticket"
    assert "No credentials cache found" in failed.value.detail
    assert server.tkeys == 0
