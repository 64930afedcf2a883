"""kmsclient's DNS queries against fake and lab responders: spoofed replies are ignored,
truncated answers are asked again over TCP, every wait is bounded; `kmsd dns-serve`."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncio_dgram
import dnslib
import pytest

from kmsclient import cli as kmsclient_cli
from kmsclient.discovery import DnsError, Resolver, matching_reply, parse_nameserver, system_config
from kmsd.dns.responder import KmsEntry, Responder, Zone, merge, parse_kms

from .conftest import KmsdProcess, start_kmsd, stop_kmsd

SRV_NAME = "_vlmcs._tcp.lab.test"
GENUINE = "kms-genuine.lab.test"
SPOOFED = "kms-spoofed.lab.test"

Reply = Callable[[dnslib.DNSRecord], dnslib.DNSRecord]


def srv_reply(query: dnslib.DNSRecord, target: str, address: str = "127.0.0.9") -> dnslib.DNSRecord:
    reply = query.reply()
    reply.add_answer(*dnslib.RR.fromZone(f"{SRV_NAME}. 60 IN SRV 0 0 1688 {target}."))
    reply.add_ar(*dnslib.RR.fromZone(f"{target}. 60 IN A {address}"))
    return reply


class FakeNameserver:
    """A nameserver on 127.0.0.2 that, before (or instead of) the genuine answer, sends
    the forgeries `spoof` makes, from 127.0.0.2 or from a second socket on 127.0.0.3."""

    def __init__(self) -> None:
        self.queries: list[dnslib.DNSRecord] = []
        self.forgeries: list[tuple[str, Reply]] = []  # (from "server" or "other", make)
        self.genuine = True

    async def start(self) -> None:
        self.sock = await asyncio_dgram.bind(("127.0.0.2", 0))
        self.other = await asyncio_dgram.bind(("127.0.0.3", 0))
        self.address = ("127.0.0.2", self.sock.sockname[1])
        self.task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            data, peer = await self.sock.recv()
            query = dnslib.DNSRecord.parse(data)
            self.queries.append(query)
            for source, make in self.forgeries:
                sock = self.sock if source == "server" else self.other
                await sock.send(make(query).pack(), peer)
            if self.genuine:
                await self.sock.send(srv_reply(query, GENUINE).pack(), peer)

    def stop(self) -> None:
        self.task.cancel()
        self.sock.close()
        self.other.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeNameserver]:
    server = FakeNameserver()
    await server.start()
    yield server
    server.stop()


def wrong_id(query: dnslib.DNSRecord) -> dnslib.DNSRecord:
    reply = srv_reply(query, SPOOFED)
    reply.header.id = (query.header.id + 1) % 0x10000
    return reply


def wrong_question(query: dnslib.DNSRecord) -> dnslib.DNSRecord:
    reply = srv_reply(query, SPOOFED)
    reply.questions = [dnslib.DNSQuestion("_vlmcs._tcp.evil.test", dnslib.QTYPE.SRV)]
    return reply


def wrong_type(query: dnslib.DNSRecord) -> dnslib.DNSRecord:
    reply = srv_reply(query, SPOOFED)
    reply.questions = [dnslib.DNSQuestion(SRV_NAME, dnslib.QTYPE.TXT)]
    return reply


def not_a_reply(query: dnslib.DNSRecord) -> dnslib.DNSRecord:
    reply = srv_reply(query, SPOOFED)
    reply.header.qr = 0
    return reply


def right(query: dnslib.DNSRecord) -> dnslib.DNSRecord:
    return srv_reply(query, SPOOFED)


@pytest.mark.system
@pytest.mark.parametrize(
    ("source", "make"),
    [
        ("server", wrong_id),
        ("server", wrong_question),
        ("server", wrong_type),
        ("server", not_a_reply),
        ("other", right),  # a perfect forgery, but from 127.0.0.3
    ],
)
async def test_spoofed_replies_are_ignored(fake: FakeNameserver, source: str, make: Reply) -> None:
    fake.forgeries = [(source, make)] * 3
    resolver = Resolver([fake.address], timeout=2.0, tries=1)
    candidates = await resolver.srv("lab.test")
    assert [c.record.target for c in candidates] == [GENUINE]
    assert candidates[0].addresses == ("127.0.0.9",)
    assert resolver.dropped == 3


@pytest.mark.system
async def test_only_forgeries_end_in_a_bounded_failure(fake: FakeNameserver) -> None:
    fake.genuine = False
    fake.forgeries = [("server", wrong_id), ("other", right)]
    resolver = Resolver([fake.address], timeout=0.2, tries=2)
    start = time.monotonic()
    with pytest.raises(DnsError, match=r"no answer within 0\.2 s"):
        await resolver.srv("lab.test")
    assert time.monotonic() - start < 1.5
    assert len(fake.queries) == 2
    assert resolver.dropped == 4


@pytest.mark.system
async def test_queries_use_random_ids(fake: FakeNameserver) -> None:
    resolver = Resolver([fake.address])
    for _ in range(8):
        await resolver.srv("lab.test")
    assert len({q.header.id for q in fake.queries}) == 8


@pytest.mark.system
async def test_each_query_comes_from_a_new_random_port() -> None:
    seen: list[int] = []
    sock = await asyncio_dgram.bind(("127.0.0.2", 0))

    async def serve() -> None:
        while True:
            data, peer = await sock.recv()
            assert isinstance(peer, tuple)
            seen.append(peer[1])
            await sock.send(srv_reply(dnslib.DNSRecord.parse(data), GENUINE).pack(), peer)

    task = asyncio.create_task(serve())
    try:
        resolver = Resolver([("127.0.0.2", sock.sockname[1])])
        for _ in range(8):
            await resolver.srv("lab.test")
    finally:
        task.cancel()
        sock.close()
    assert len(set(seen)) == 8
    assert all(1024 <= port <= 65535 for port in seen)


def test_matching_reply_checks_id_question_and_qr() -> None:
    query = dnslib.DNSRecord.question(SRV_NAME, "SRV")
    good = srv_reply(query, GENUINE)
    qid = query.header.id
    assert matching_reply(good.pack(), qid, SRV_NAME, "SRV") is not None
    assert matching_reply(good.pack(), qid, SRV_NAME.upper(), "SRV") is not None  # 0x20
    assert matching_reply(good.pack(), qid ^ 1, SRV_NAME, "SRV") is None
    assert matching_reply(good.pack(), qid, "_vlmcs._tcp.other.test", "SRV") is None
    assert matching_reply(good.pack(), qid, SRV_NAME, "A") is None
    assert matching_reply(query.pack(), qid, SRV_NAME, "SRV") is None  # a query, not a reply
    assert matching_reply(b"\x00" * 5, qid, SRV_NAME, "SRV") is None


# The lab responder (kmsd dns-serve) and TCP fallback.


@pytest.fixture
async def lab_zone() -> AsyncIterator[tuple[Responder, tuple[str, int]]]:
    hosts = [KmsEntry(f"kms{i}", (f"127.0.1.{i}",), 1688, i % 3, i) for i in range(1, 41)]
    responder = Responder(Zone("lab.test", hosts, ttl=60))
    await responder.start([("127.0.0.1", 0)])
    yield responder, responder.addresses[0]
    await responder.stop()


@pytest.mark.system
async def test_a_truncated_answer_is_asked_again_over_tcp(
    lab_zone: tuple[Responder, tuple[str, int]],
) -> None:
    _, address = lab_zone
    zone = lab_zone[0].zone
    query = dnslib.DNSRecord.question(SRV_NAME, "SRV")
    over_udp = dnslib.DNSRecord.parse(zone.answer(query.pack(), udp=True) or b"")
    assert over_udp.header.tc and not over_udp.rr
    candidates = await Resolver([address]).srv("lab.test")
    assert len(candidates) == 40
    assert {c.addresses for c in candidates} == {(f"127.0.1.{i}",) for i in range(1, 41)}


@pytest.mark.system
async def test_targets_without_additional_records_are_queried(
    lab_zone: tuple[Responder, tuple[str, int]],
) -> None:
    responder, address = lab_zone
    responder.zone.records = [
        rr
        for rr in responder.zone.records
        if rr.rtype != dnslib.QTYPE.A or str(rr.rname) != "kms7.lab.test."
    ] + dnslib.RR.fromZone("kms7.lab.test. 60 IN AAAA ::1")
    resolver = Resolver([address])
    assert await resolver.addresses("kms7.lab.test") == ("::1",)
    assert await resolver.addresses("kms8.lab.test") == ("127.0.1.8",)
    assert await resolver.addresses("nothing.lab.test") == ()


def test_zone_answers() -> None:
    zone = Zone(
        "lab.test", merge([parse_kms("127.0.0.2:1700,priority=1,weight=5"), parse_kms("[::1]", 2)])
    )

    def ask(name: str, qtype: str) -> dnslib.DNSRecord:
        return dnslib.DNSRecord.parse(zone.answer(dnslib.DNSRecord.question(name, qtype).pack()))

    srv = ask(SRV_NAME, "SRV")
    assert srv.header.aa and srv.header.rcode == dnslib.RCODE.NOERROR
    assert sorted(str(rr.rdata) for rr in srv.rr) == [
        "0 0 1688 kms2.lab.test.",
        "1 5 1700 kms1.lab.test.",
    ]
    assert sorted(str(rr.rdata) for rr in srv.ar) == ["127.0.0.2", "::1"]
    assert ask("kms2.lab.test", "AAAA").rr[0].rdata == dnslib.AAAA("::1")
    nodata = ask("kms2.lab.test", "A")
    assert nodata.header.rcode == dnslib.RCODE.NOERROR and not nodata.rr and nodata.auth
    assert ask("_tcp.lab.test", "A").header.rcode == dnslib.RCODE.NOERROR  # empty non-terminal
    assert ask("nope.lab.test", "A").header.rcode == dnslib.RCODE.NXDOMAIN
    assert ask("example.com", "A").header.rcode == dnslib.RCODE.REFUSED
    assert ask("lab.test", "SOA").rr[0].rtype == dnslib.QTYPE.SOA
    assert zone.answer(b"junk") is None
    assert zone.answer(srv.pack()) is None  # a reply is never answered


@pytest.mark.parametrize(
    ("text", "entry"),
    [
        ("127.0.0.2", KmsEntry("kms1", ("127.0.0.2",))),
        ("127.0.0.2:1700,priority=3,weight=7", KmsEntry("kms1", ("127.0.0.2",), 1700, 3, 7)),
        ("[::1]:1688,name=host", KmsEntry("host", ("::1",), 1688)),
        ("::1", KmsEntry("kms1", ("::1",))),
    ],
)
def test_parse_kms(text: str, entry: KmsEntry) -> None:
    assert parse_kms(text) == entry


@pytest.mark.parametrize("text", ["kms.lab:1688", "127.0.0.2,prio=1", "127.0.0.2,weight=70000"])
def test_parse_kms_errors(text: str) -> None:
    with pytest.raises(ValueError):
        parse_kms(text)


def test_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# comment\nnameserver 192.0.2.1\nnameserver fe80::1%eth0\ndomain a.test\n"
        "search lab.test corp.test.\noptions ndots:2\n"
    )
    assert system_config(conf) == ([("192.0.2.1", 53), ("fe80::1", 53)], ["lab.test", "corp.test"])
    assert system_config(tmp_path / "missing") == ([("127.0.0.1", 53)], [])
    assert parse_nameserver("[::1]:5353") == ("::1", 5353)
    with pytest.raises(ValueError):
        parse_nameserver("ns.lab.test")


# kmsd dns-serve as a process, dig, and kmsclient through it.


@pytest.mark.system
def test_dns_serve_process_dig_discover_and_activate(tmp_path: Path) -> None:
    kmsd = start_kmsd("--fixed-count", "50", listen="127.0.0.4:0")
    dns = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kmsd",
            "dns-serve",
            "lab.test",
            "--listen",
            "127.0.0.1:0",
            "--kms",
            "127.0.0.5:1,priority=0,weight=10",  # nothing listens: the client fails over
            "--kms",
            f"127.0.0.4:{kmsd.port},priority=5",
            "--log-format",
            "json",
        ],
        stderr=subprocess.PIPE,
    )
    try:
        wrapped = KmsdProcess(dns, "127.0.0.1", 0)
        address = str(wrapped.read_log_until("dns listening")["address"])
        wrapped.read_log_until("dns-serve ready")
        host, _, port = address.rpartition(":")
        if shutil.which("dig"):
            for transport in ("+notcp", "+tcp"):
                short = subprocess.run(
                    ["dig", f"@{host}", "-p", port, SRV_NAME, "SRV", "+short", transport],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
                assert sorted(short.split("\n")[:2]) == [
                    "0 10 1 kms1.lab.test.",
                    f"5 0 {kmsd.port} kms2.lab.test.",
                ]
        state = tmp_path / "kms-host.json"
        common = ["--nameserver", address, "--state", str(state), "--json"]
        out = io.StringIO()
        assert kmsclient_cli.main(["activate", "--domain", "lab.test", *common], out) == 0
        result = json.loads(out.getvalue())
        assert result["host"] == f"127.0.0.4:{kmsd.port}"
        attempts = result["discovery"]["attempts"]
        assert [(a["host"], a["status"]) for a in attempts] == [
            ("kms1.lab.test", "unreachable"),
            ("kms2.lab.test", "activated"),
        ]
        assert json.loads(state.read_text()) == {
            "lab.test": {"name": "kms2.lab.test", "port": kmsd.port}
        }
        out = io.StringIO()
        assert kmsclient_cli.main(["activate", "--domain", "lab.test", *common], out) == 0
        assert json.loads(out.getvalue())["discovery"]["source"] == "cache"
        out = io.StringIO()
        code = kmsclient_cli.main(
            ["discover", "lab.test", "--nameserver", address, "--probe", "--json"], out
        )
        assert code == 0
        (domain,) = json.loads(out.getvalue())["domains"]
        assert domain["order"] == ["kms1.lab.test:1", f"kms2.lab.test:{kmsd.port}"]
        assert [p["answers"] for p in domain["probe"]] == [False, True]
    finally:
        dns.terminate()
        dns.wait(timeout=10)
        stop_kmsd(kmsd)


@pytest.mark.system
def test_static_host_bypasses_dns(kmsd_process: KmsdProcess, tmp_path: Path) -> None:
    out = io.StringIO()
    # A nameserver that does not exist: were it asked, the activation would fail.
    args = ["activate", f"{kmsd_process.host}:{kmsd_process.port}", "--nameserver", "127.0.0.1:9"]
    code = kmsclient_cli.main([*args, "--state", str(tmp_path / "s.json")], out)
    assert code in (0, 3)
    assert "Discovery" not in out.getvalue()
    assert not (tmp_path / "s.json").exists()
