"""kmsd publishes into Active Directory DNS with GSS-TSIG: a real Samba AD domain controller
(tests/samba.py), provisioned offline on loopback, secure updates only (its default).

Accounts: KMS1$ and KMS2$ are kmsd hosts in the group "KMS Hosts"; KMS3$ is an account
outside it. The first account to write a name owns it; the group gets full control over
_vlmcs._tcp as an administrator would give it (README, "Windows lab"). A BIND 9 with TSIG
serves another domain for the several-targets test.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsclient import cli as kmsclient_cli
from kmsd.dns import gss
from kmsd.dns.check import noop_update
from kmsd.dns.gss import GssCredentials, GssSigner
from kmsd.dns.publish import exchange, send_update

from . import bind as bind_server
from . import samba as samba_dc
from .bind import Bind
from .conftest import KmsdProcess, publish_settings, run_kmsd, start_kmsd, stop_kmsd
from .samba import DOMAIN, REALM, Samba

SRV_NAME = f"_vlmcs._tcp.{DOMAIN}"
CORP = "corp.test"  # the BIND domain

if not samba_dc.installed():
    if os.environ.get("CI"):
        raise RuntimeError("samba, samba-ad-provision, krb5-user must be installed (.ci/run)")
    pytest.skip("Samba AD DC or the Kerberos tools are not installed", allow_module_level=True)
pytest.importorskip("gssapi")


class Lab:
    def __init__(self, samba: Samba) -> None:
        self.samba = samba
        self.keytabs: dict[str, Path] = {}
        self.group_sid = ""


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    directory = tmp_path_factory.mktemp("samba")
    samba = samba_dc.start(directory)
    previous = os.environ.get("KRB5_CONFIG")
    os.environ["KRB5_CONFIG"] = str(samba.krb5_conf)  # for kmsd, kinit and klist
    try:
        began = time.monotonic()
        lab = Lab(samba)
        lab.keytabs.update(samba.machine_accounts("KMS1", "KMS2", "KMS3"))
        lab.group_sid = samba.group("KMS Hosts", "KMS1$", "KMS2$")
        samba.timings["accounts"] = time.monotonic() - began
        print(f"samba timings: {samba.timings}")
        yield lab
    finally:
        samba_dc.stop(samba)
        if previous is None:
            os.environ.pop("KRB5_CONFIG", None)
        else:
            os.environ["KRB5_CONFIG"] = previous


@pytest.fixture(scope="module")
def bind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bind]:
    yield from bind_server.running(tmp_path_factory.mktemp("named"), CORP)


def free_port(*addresses: str) -> int:
    """A TCP port free on every one of `addresses`."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as first:
            first.bind((addresses[0], 0))
            port = int(first.getsockname()[1])
            try:
                for address in addresses[1:]:
                    family = socket.AF_INET6 if ":" in address else socket.AF_INET
                    with socket.socket(family, socket.SOCK_STREAM) as other:
                        other.bind((address, port))
            except OSError:
                continue
            return port


def gss_target(lab: Lab, account: str, *, priority: int = 0, weight: int = 0) -> str:
    """A --publish-target for the Samba domain, signed as `account`."""
    return (
        f"{DOMAIN} server={lab.samba.nameserver} keytab={lab.keytabs[account]} "
        f"principal={account}$@{REALM} host={account.lower()}.{DOMAIN} "
        f"priority={priority} weight={weight} ttl=30"
    )


def samba_dig_all(samba: Samba) -> list[str]:
    return samba.dig(SRV_NAME, "SRV") + samba.dig(f"kms1.{DOMAIN}", "A")


def kmsd_on(address: str, *targets: str, extra: tuple[str, ...] = ()) -> KmsdProcess:
    args = [a for t in targets for a in ("--publish-target", t)]
    return start_kmsd("--fixed-count", "50", *args, *extra, listen=f"{address}:0")


def activate(samba: Samba, state: Path) -> dict[str, object]:
    out = io.StringIO()
    argv = ["activate", "--domain", DOMAIN, "--nameserver", samba.nameserver]
    kmsclient_cli.main([*argv, "--state", str(state), "--json", "--timeout", "2"], out)
    result: dict[str, object] = json.loads(out.getvalue())
    return result


def test_secure_publication_rights_refusals_discovery_and_clean_withdrawal(
    lab: Lab, tmp_path: Path
) -> None:
    samba = lab.samba
    port = free_port("127.0.88.2", "::1")
    first = start_kmsd(
        "--fixed-count",
        "50",
        "--publish-target",
        gss_target(lab, "KMS1", priority=0, weight=10),
        "--listen",
        f"[::1]:{port}",
        listen=f"127.0.88.2:{port}",
    )
    hosts = [first]
    try:
        published = first.read_log_until("dns published", timeout=30)
        assert published["srv"] == f"{SRV_NAME}. 0 10 {port} kms1.{DOMAIN}."
        assert samba.dig(SRV_NAME, "SRV") == [f"0 10 {port} kms1.{DOMAIN}."]
        assert samba.dig(f"kms1.{DOMAIN}", "A") == ["127.0.88.2"]
        assert samba.dig(f"kms1.{DOMAIN}", "AAAA") == ["::1"]
        result = activate(samba, tmp_path / "state.json")
        assert result["status"] == "activated"
        assert result["discovery"]["attempts"][0]["host"] == f"kms1.{DOMAIN}"  # type: ignore[index]

        # An unsigned update: refused, and kmsd says why.
        unsigned = kmsd_on(
            "127.0.88.3", f"{DOMAIN} server={samba.nameserver} host=kms-unsigned.{DOMAIN}"
        )
        hosts.append(unsigned)
        failed = unsigned.read_log_until("dns update failed", timeout=30)
        assert failed["rcode"] == "REFUSED"
        assert "signed updates only" in str(failed["error"])

        # An account outside the group: authenticated, but _vlmcs._tcp is not its name.
        outsider = kmsd_on("127.0.88.4", gss_target(lab, "KMS3"))
        hosts.append(outsider)
        failed = outsider.read_log_until("dns update failed", timeout=30)
        assert failed["rcode"] in ("SERVFAIL", "REFUSED")
        assert "refused by the server's policy" in str(failed["error"])
        assert samba.dig(SRV_NAME, "SRV") == [f"0 10 {port} kms1.{DOMAIN}."]

        # The group gets full control over _vlmcs._tcp: a second host of the group publishes.
        samba.grant_full_control("_vlmcs._tcp", lab.group_sid)
        second = kmsd_on("127.0.88.5", gss_target(lab, "KMS2", priority=10, weight=5))
        hosts.append(second)
        second.read_log_until("dns published", timeout=30)
        assert samba.dig(SRV_NAME, "SRV") == [
            f"0 10 {port} kms1.{DOMAIN}.",
            f"10 5 {second.port} kms2.{DOMAIN}.",
        ]
        assert stop_kmsd(outsider) == 0  # it never published: nothing to withdraw
        assert not any(e.get("event") == "dns withdrawn" for e in outsider.log)

        # A clean stop removes exactly the stopping host's records.
        assert stop_kmsd(first) == 0
        assert any(e.get("event") == "dns withdrawn" for e in first.log)
        assert samba.dig(SRV_NAME, "SRV") == [f"10 5 {second.port} kms2.{DOMAIN}."]
        assert samba.dig(f"kms1.{DOMAIN}", "A") == []
        assert samba.dig(f"kms1.{DOMAIN}", "AAAA") == []
        assert samba.dig(f"kms2.{DOMAIN}", "A") == ["127.0.88.5"]
        assert samba.dig(f"dc1.{DOMAIN}", "A") == [samba_dc.ADDRESS]
        assert stop_kmsd(second) == 0
        assert samba.dig(SRV_NAME, "SRV") == []
    finally:
        for kmsd in hosts:
            stop_kmsd(kmsd)


def test_wrong_credentials_are_refused_with_the_reason(lab: Lab) -> None:
    # A keytab without the principal's keys: found before anything is contacted.
    mixed = gss_target(lab, "KMS2").replace(str(lab.keytabs["KMS2"]), str(lab.keytabs["KMS1"]))
    result = run_kmsd("check-config", "--publish-target", mixed)
    assert result.returncode == 2
    assert f"keytab {lab.keytabs['KMS1']} holds no key for KMS2$@{REALM}" in result.stderr

    # A keytab whose keys the domain no longer accepts (the password changed since):
    # the KDC refuses, kmsd says why, retries, and serves on.
    lab.keytabs.update(lab.samba.machine_accounts("KMS4"))
    lab.samba.tool(["user", "setpassword", "KMS4$", f"--newpassword={os.urandom(12).hex()}Aa1!"])
    kmsd = kmsd_on("127.0.88.6", gss_target(lab, "KMS4"))
    try:
        failed = kmsd.read_log_until("dns update failed", timeout=30)
        assert failed["rcode"] == "GSSAPI"
        assert str(failed["error"]).startswith("wrong password or key: ")
        assert "Preauthentication failed" in str(failed["error"])
        assert failed["credentials"] == f"GSS-TSIG as KMS4$@{REALM} (keytab {lab.keytabs['KMS4']})"
        assert failed["retry_in"] == 1.0
        assert kmsd.read_log_until("dns update failed", timeout=10)["retry_in"] == 2.0
        out = io.StringIO()
        assert kmsclient_cli.main(["activate", f"127.0.88.6:{kmsd.port}"], out) == 0
    finally:
        assert stop_kmsd(kmsd) == 0


def test_two_domains_ad_and_bind_then_a_reload_drops_one(
    lab: Lab, bind: Bind, tmp_path: Path
) -> None:
    samba = lab.samba
    config = tmp_path / "kmsd.toml"
    ad_table = f"""[[dns.publish_target]]
zone = "{DOMAIN}"
server = "{samba.nameserver}"
keytab = "{lab.keytabs["KMS1"]}"
principal = "KMS1$@{REALM}"
host = "kms1.{DOMAIN}"
priority = 0
weight = 10
ttl = 30
"""
    bind_table = f"""[[dns.publish_target]]
zone = "{CORP}"
server = "{bind.address}"
key = "{bind.key}"
host = "kms1.{CORP}"
priority = 20
weight = 3
ttl = 30
"""
    config.write_text(ad_table + bind_table)
    kmsd = start_kmsd("--config", str(config), "--fixed-count", "50", listen="127.0.88.7:0")
    try:
        zones = {kmsd.read_log_until("dns published", timeout=30)["zone"] for _ in range(2)}
        assert zones == {f"{DOMAIN}.", f"{CORP}."}
        assert samba.dig(SRV_NAME, "SRV") == [f"0 10 {kmsd.port} kms1.{DOMAIN}."]
        assert bind.dig(f"_vlmcs._tcp.{CORP}", "SRV") == [f"20 3 {kmsd.port} kms1.{CORP}."]
        assert bind.dig(f"kms1.{CORP}", "A") == ["127.0.88.7"]

        config.write_text(ad_table)
        kmsd.process.send_signal(signal.SIGHUP)
        withdrawn = kmsd.read_log_until("dns withdrawn", timeout=30)
        assert withdrawn["zone"] == f"{CORP}."
        assert bind.dig(f"_vlmcs._tcp.{CORP}", "SRV") == []
        assert bind.dig(f"kms1.{CORP}", "A") == []
        assert samba.dig(SRV_NAME, "SRV") == [f"0 10 {kmsd.port} kms1.{DOMAIN}."]
    finally:
        assert stop_kmsd(kmsd) == 0
    assert samba.dig(SRV_NAME, "SRV") == []


def test_dns_check_reports_each_target(lab: Lab, bind: Bind) -> None:
    nowhere = (
        f"other.test server={lab.samba.nameserver} keytab={lab.keytabs['KMS1']} "
        f"principal=KMS1$@{REALM} service=DNS/nowhere.{DOMAIN}@{REALM}"
    )
    argv = [
        "dns-check",
        "--publish-target",
        gss_target(lab, "KMS1"),
        "--publish-target",
        f"{CORP} server={bind.address} key={bind.key}",
        "--publish-target",
        nowhere,
    ]
    result = run_kmsd(*argv)
    lines = result.stdout.splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 3, result.stdout
    assert lines[0].startswith(f"{DOMAIN} at {lab.samba.nameserver} (GSS-TSIG as KMS1$@")
    assert lines[0].endswith(": ok: signed update accepted (nothing changed)")
    assert lines[1] == (
        f"{CORP} at {bind.address} (TSIG key kmsd-key): ok: signed update accepted "
        "(nothing changed)"
    )
    assert ": FAILED: GSSAPI: unknown principal: " in lines[2]
    assert samba_dig_all(lab.samba) == []  # nothing was published or left behind


async def test_a_context_lasts_as_long_as_its_ticket_and_is_renewed_before_it_ends(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    short = tmp_path / "krb5.conf"
    text = lab.samba.krb5_conf.read_text()
    short.write_text(text.replace("[libdefaults]", "[libdefaults]\n    ticket_lifetime = 600s"))
    monkeypatch.setenv("KRB5_CONFIG", str(short))
    ccache = f"FILE:{tmp_path / 'ccache'}"  # this test's own tickets
    creds = GssCredentials(f"KMS1$@{REALM}", keytab=lab.keytabs["KMS1"], ccache=ccache)
    now = [time.time()]
    signer = GssSigner(creds, clock=lambda: now[0])
    service = f"DNS@dc1.{DOMAIN}"
    first = await signer.signing_key(lab.samba.server, service, exchange)
    assert 500 < signer.expires - now[0] <= 600  # the ticket's lifetime, not TKEY's
    assert await signer.signing_key(lab.samba.server, service, exchange) is first
    now[0] = signer.expires - gss.RENEW_MARGIN  # the ticket is about to end
    second = await signer.signing_key(lab.samba.server, service, exchange)
    assert second.name != first.name
    settings = publish_settings(DOMAIN, server=lab.samba.server, gss=creds)
    await send_update(noop_update(settings, second), lab.samba.server)  # the new one signs
