"""kmsd as a test double, checked on the wire through its own pytest plugin: every response
kind a rule can give, as kmsclient's strict verifier (and impacket, for the RPC-level
ones) sees it; what rules match; the journal; the virtual clock; reset and failover."""

from __future__ import annotations

import asyncio
import struct
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from impacket.dcerpc.v5 import rpcrt, transport
from impacket.uuid import uuidtup_to_bin

from kmsclient.activation import CallOptions, Result, activate
from kmsclient.discovery import Resolver, parse_nameserver
from kmsclient.outcome import Status
from kmsclient.target import parse_target
from kmsd.journal import Filter
from kmsd.protocol import kms, ndr
from kmsd.protocol.client import base_request, prepare
from kmsd.protocol.errors import HResult
from kmsd.protocol.products import products
from kmsd.rules import TAMPER_CHECKS
from kmsd.testing import KmsDns, KmsTestHost

WIN = "Windows 10/11 Enterprise"
OFFICE = "Office LTSC Professional Plus 2021"
SERVER = "Windows Server 2022 Standard"
OPTIONS = CallOptions(timeout=5.0)


def call(host: KmsTestHost, product: str = WIN, **fields: Any) -> Result:
    """One activation by kmsclient's strict client, verified as `kmsclient activate` does."""
    sku = products().sku_by_name(product)
    assert sku is not None
    prepared = prepare(base_request(sku, **fields))
    return asyncio.run(activate(parse_target(host.target), prepared, OPTIONS))


def count_of(result: Result) -> int:
    assert result.verified is not None, result.failure
    return result.verified.reply.base.count


def test_without_rules_the_host_counts_as_a_real_one(kms_host: KmsTestHost) -> None:
    first = call(kms_host)
    assert (first.status, count_of(first)) == (Status.BELOW_THRESHOLD, 1)
    assert count_of(call(kms_host)) == 2
    assert kms_host.counts == {"Windows": 2}


@pytest.mark.parametrize(
    ("spec", "status", "count"),
    [
        ({"count": 25}, Status.ACTIVATED, 25),
        ({"count": "threshold-1"}, Status.BELOW_THRESHOLD, 24),
        ({"count": 0}, Status.BELOW_THRESHOLD, 0),
    ],
    ids=["count", "threshold-1", "zero"],
)
def test_count(kms_host: KmsTestHost, spec: dict[str, Any], status: Status, count: int) -> None:
    kms_host.rule(**spec)
    result = call(kms_host)
    assert (result.status, count_of(result)) == (status, count)
    assert kms_host.counts == {"Windows": 1}  # the client was recorded all the same


@pytest.mark.parametrize(
    ("hresult", "expected"),
    [("KMS_ID_MISMATCH", 0xC004F042), ("0xC004F050", 0xC004F050), ("invalid_data", 0x8007000D)],
)
def test_hresult(kms_host: KmsTestHost, hresult: str, expected: int) -> None:
    kms_host.rule(hresult=hresult)
    result = call(kms_host)
    assert result.status == Status.REFUSED
    assert result.failure is not None and result.failure.hresult == expected
    assert kms_host.counts == {}  # a refused client is not counted
    entry = kms_host.journal[-1]
    assert (entry.answer, entry.hresult, entry.rule) == ("hresult", expected, "rule 1")


def test_fault(kms_host: KmsTestHost) -> None:
    kms_host.rule(fault="SERVER_TOO_BUSY")
    result = call(kms_host)
    assert result.status == Status.REFUSED
    assert result.failure is not None and result.failure.kind == "rpc"
    assert "0x1C010014" in result.failure.message
    assert kms_host.journal[-1].answer == "fault"


def test_close_without_reply(kms_host: KmsTestHost) -> None:
    kms_host.rule(close=True)
    result = call(kms_host)
    assert result.status == Status.UNREACHABLE
    assert result.failure is not None and result.failure.kind == "closed"
    assert kms_host.journal[-1].answer == "close"


def test_bind_nak(kms_host: KmsTestHost) -> None:
    kms_host.rule(bind_nak="LOCAL_LIMIT_EXCEEDED", client="127.0.0.0/8")
    result = call(kms_host)
    assert result.status == Status.REFUSED
    assert result.failure is not None and "bind_nak reason 2" in result.failure.message
    entry = kms_host.journal[-1]
    assert (entry.answer, entry.value, entry.request) == ("bind_nak", 2, None)


TAMPERED = [
    (check, version) for check, versions in TAMPER_CHECKS.items() for version in sorted(versions)
]


@pytest.mark.parametrize(("check", "version"), TAMPERED, ids=[f"{c}-V{v}" for c, v in TAMPERED])
def test_tampered_reply_fails_exactly_the_named_check(
    kms_host: KmsTestHost, check: str, version: int
) -> None:
    kms_host.rule(tamper=check)
    result = call(kms_host, major=version)
    assert result.status == Status.NOT_GENUINE, result
    assert result.failure is not None and result.failure.check == check
    assert kms_host.journal[-1].rule == "rule 1"


def test_tamper_applies_only_to_versions_that_have_the_check(kms_host: KmsTestHost) -> None:
    kms_host.rule(tamper="hmac")
    assert call(kms_host, major=5).status == Status.BELOW_THRESHOLD
    assert call(kms_host, major=6).status == Status.NOT_GENUINE


def test_given_epid_hwid_and_intervals(kms_host: KmsTestHost) -> None:
    epid = "06401-00206-271-392041-03-1033-17763.0000-2892018"
    kms_host.rule(epid=epid, hwid="0011223344556677", activation_interval=30, renewal_interval=900)
    result = call(kms_host)
    assert result.verified is not None
    reply = result.verified.reply
    assert (reply.base.epid, reply.hwid.hex()) == (epid, "0011223344556677")
    assert (reply.base.activation_interval, reply.base.renewal_interval) == (30, 900)


def test_delay(kms_host: KmsTestHost) -> None:
    kms_host.rule(delay=0.4, count=25)
    started = time.monotonic()
    result = call(kms_host)
    assert result.status == Status.ACTIVATED
    assert time.monotonic() - started >= 0.35
    latency = kms_host.journal[-1].latency
    assert latency is not None and latency >= 0.35


def test_delayed_close_is_a_silent_host(kms_host: KmsTestHost) -> None:
    kms_host.rule(close=True, delay=3)
    sku = products().sku_by_name(WIN)
    assert sku is not None
    prepared = prepare(base_request(sku))
    options = CallOptions(timeout=0.5)
    result = asyncio.run(activate(parse_target(kms_host.target), prepared, options))
    assert result.failure is not None and result.failure.kind == "timeout"


# What rules match ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("match", "hit", "miss"),
    [
        ({"product": WIN}, {}, {"product": OFFICE}),
        ({"application": "Windows"}, {"product": SERVER}, {"product": OFFICE}),
        ({"kms_id": "Windows 10/11 (Volume)"}, {}, {"product": SERVER}),
        ({"workstation": "LAB-*"}, {"workstation": "lab-7.example"}, {"workstation": "pc-7"}),
        ({"protocol": "5.0"}, {"major": 5}, {"major": 6}),
        ({"client": "127.0.0.0/8"}, {}, None),
        ({"client": "10.0.0.0/8"}, None, {}),
        (
            {"cmid": "11111111-2222-3333-4444-555555555555"},
            {"client_machine_id": uuid.UUID("11111111-2222-3333-4444-555555555555")},
            {},
        ),
    ],
    ids=[
        "product",
        "application",
        "kms_id",
        "workstation",
        "protocol",
        "client",
        "not-client",
        "cmid",
    ],
)
def test_match(
    kms_host: KmsTestHost,
    match: dict[str, Any],
    hit: dict[str, Any] | None,
    miss: dict[str, Any] | None,
) -> None:
    kms_host.rule(hresult="INVALID_DATA", **match)
    if hit is not None:
        assert call(kms_host, **hit).status == Status.REFUSED
    if miss is not None:
        assert call(kms_host, **miss).status == Status.BELOW_THRESHOLD


def test_rules_apply_in_order_for_their_number_of_times(kms_host: KmsTestHost) -> None:
    kms_host.rule(count=7, times=2)
    kms_host.rule(count=9)
    assert [count_of(call(kms_host)) for _ in range(4)] == [7, 7, 9, 9]
    assert [r.spec for r in kms_host.current_rules()] == [{"count": 9}]


def test_a_rule_for_a_time_window_ends_on_the_host_clock(kms_host: KmsTestHost) -> None:
    kms_host.rule(count=25, seconds=3600)
    assert count_of(call(kms_host)) == 25
    kms_host.clock.advance(minutes=59)
    assert count_of(call(kms_host)) == 25
    kms_host.clock.advance(minutes=2)
    assert count_of(call(kms_host)) == 3
    assert kms_host.current_rules() == []


def test_remove_rule(kms_host: KmsTestHost) -> None:
    rule = kms_host.rule(count=25)
    assert count_of(call(kms_host)) == 25
    assert kms_host.remove_rule(rule)
    assert not kms_host.remove_rule(rule)
    assert count_of(call(kms_host)) == 2


# The journal and the clock ------------------------------------------------------------


def test_journal_holds_the_decoded_request_and_the_answer(kms_host: KmsTestHost) -> None:
    cmid, previous = uuid.uuid4(), uuid.uuid4()
    call(
        kms_host,
        client_machine_id=cmid,
        previous_client_machine_id=previous,
        workstation="ws-1.lab.test",
        is_vm=1,
        license_status=5,
        major=5,
    )
    [entry] = kms_host.journal
    assert (entry.seq, entry.answer, entry.count, entry.rule) == (1, "count", 1, None)
    assert entry.product == WIN and entry.application == "Windows"
    assert entry.address == "127.0.0.1" and entry.peer.startswith("127.0.0.1:")
    assert entry.time == kms_host.clock()
    assert entry.latency is not None and entry.latency > 0  # sub-millisecond, even under uvloop
    data = entry.to_json()
    assert data["rpc"] == {"call_id": 2, "ndr": "NDR32"}
    request = data["request"]
    assert request["client_machine_id"] == str(cmid)
    assert request["previous_client_machine_id"] == str(previous)
    assert request["workstation"] == "ws-1.lab.test"
    assert (request["vm"], request["license_status"], request["protocol"]) == (True, 5, "5.0")
    assert (request["kms_group"], request["required_count"]) == ("Windows 10/11 (Volume)", 25)
    assert data["answer"] == {"kind": "count", "count": 1}


def test_journal_filters_and_cursor(kms_host: KmsTestHost) -> None:
    kms_host.rule(hresult="KMS_ID_MISMATCH", product=OFFICE, name="no office")
    call(kms_host, workstation="a-1")
    call(kms_host, product=OFFICE, workstation="b-1")
    call(kms_host, workstation="a-2")
    assert [e.workstation for e in kms_host.select(Filter(workstation="A-*"))] == ["a-1", "a-2"]
    assert [e.seq for e in kms_host.select(Filter(rule="no office"))] == [2]
    assert [e.seq for e in kms_host.select(Filter(answer="hresult"))] == [2]
    assert [e.seq for e in kms_host.select(Filter(product="office"))] == [2]
    assert [e.seq for e in kms_host.select(Filter(since=2))] == [3]
    assert [e.seq for e in kms_host.select(Filter(client="10.0.0.0/8"))] == []
    assert [e.seq for e in kms_host.select(Filter(limit=1))] == [1]


def test_31_days_later_the_count_has_dropped(kms_host: KmsTestHost) -> None:
    for _ in range(3):
        call(kms_host)
    kms_host.clock.advance(days=29)
    assert count_of(call(kms_host)) == 4
    kms_host.clock.advance(days=2)  # the first three are 31 days old, the fourth 2 days
    assert kms_host.counts == {"Windows": 1}
    assert count_of(call(kms_host)) == 2


def test_reset(kms_host: KmsTestHost) -> None:
    kms_host.rule(count=25)
    call(kms_host)
    kms_host.clock.advance(days=3)
    kms_host.reset()
    assert kms_host.journal == [] and kms_host.current_rules() == []
    assert abs(kms_host.clock() - time.time()) < 60
    assert count_of(call(kms_host)) == 1
    assert kms_host.journal[0].seq == 2  # a reader's cursor stays valid across a reset


async def test_async_host_on_the_tests_loop() -> None:
    async with KmsTestHost() as host:
        host.rule(count=25)
        sku = products().sku_by_name(WIN)
        assert sku is not None
        result = await activate(parse_target(host.target), prepare(base_request(sku)), OPTIONS)
        assert result.status == Status.ACTIVATED
        assert [e.count for e in host.journal] == [25]
        await host.reset_async()
        assert host.journal == []


# Several hosts and DNS ----------------------------------------------------------------


def test_kms_dns_advertises_the_hosts_in_order(
    kms_hosts: Callable[[int], list[KmsTestHost]], kms_dns: Callable[..., KmsDns]
) -> None:
    """(Failover through these records, with a tool: tests/test_example_tool.py.)"""
    primary, backup = kms_hosts(2)
    dns = kms_dns(primary, backup, zone="lab.test")
    resolver = Resolver([parse_nameserver(dns.nameserver)], timeout=2.0)
    candidates = asyncio.run(resolver.srv(dns.zone))
    assert [(c.priority, c.record.port, c.addresses) for c in candidates] == [
        (0, primary.port, ("127.0.0.1",)),
        (10, backup.port, ("127.0.0.1",)),
    ]


def test_session_hosts_are_reset_for_each_test(
    kms_hosts: Callable[[int], list[KmsTestHost]],
) -> None:
    [host] = kms_hosts(1)
    assert host.journal == [] and host.current_rules() == []
    host.rule(count=25)
    assert count_of(call(host)) == 25


# RPC-level answers as impacket sees them ----------------------------------------------

KMS_INTERFACE = uuidtup_to_bin(("51c82175-844e-4750-b0d8-ec255555bc06", "1.0"))


def impacket_call(host: KmsTestHost) -> rpcrt.DCERPC_v5:
    rpc = transport.DCERPCTransportFactory(f"ncacn_ip_tcp:127.0.0.1[{host.port}]")
    rpc.set_connect_timeout(5)
    dce = rpc.get_dce_rpc()
    dce.connect()
    return dce


def impacket_request(dce: rpcrt.DCERPC_v5) -> None:
    """Bind and send one NDR32 RequestActivation for Windows 10/11 Enterprise."""
    dce.bind(KMS_INTERFACE)
    sku = products().sku_by_name(WIN)
    assert sku is not None
    dce.call(0, ndr.wrap_request(kms.encode_request(base_request(sku), iv=bytes(16)), False))


def test_fault_as_impacket_sees_it(kms_host: KmsTestHost) -> None:
    kms_host.rule(fault="0x1C010003")
    dce = impacket_call(kms_host)
    try:
        impacket_request(dce)
        with pytest.raises(rpcrt.DCERPCException, match=r"^nca_s_unk_if$"):
            dce.recv()
    finally:
        dce.disconnect()


def test_bind_nak_as_impacket_sees_it(kms_host: KmsTestHost) -> None:
    kms_host.rule(bind_nak=4)
    dce = impacket_call(kms_host)
    try:
        # impacket names reason 4 (protocol_version_not_supported) its own way
        rejected = r"^Bind context rejected: protocol_version"
        with pytest.raises(rpcrt.DCERPCException, match=rejected):
            dce.bind(KMS_INTERFACE)
    finally:
        dce.disconnect()
    [entry] = kms_host.journal
    assert (entry.answer, entry.value) == ("bind_nak", 4)


def test_hresult_as_impacket_sees_it(kms_host: KmsTestHost) -> None:
    kms_host.rule(hresult="INVALID_TIMESTAMP")
    dce = impacket_call(kms_host)
    try:
        impacket_request(dce)
        reply = dce.recv()
        assert ndr.unwrap_response(reply, False) == (b"", HResult.INVALID_TIMESTAMP)
        assert struct.unpack_from("<I", reply, len(reply) - 4)[0] == HResult.INVALID_TIMESTAMP
    finally:
        dce.disconnect()
