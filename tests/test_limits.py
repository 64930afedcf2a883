"""Admission and limits: allowed networks, per-address caps, request rate, slow senders."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsclient.session import KmsConnection
from kmsd.limits import Admission, Refusal, source_of
from kmsd.protocol import ndr
from kmsd.protocol.client import RpcClient, base_request
from kmsd.protocol.errors import FaultStatus
from kmsd.protocol.kms import encode_request
from kmsd.protocol.products import products
from kmsd.protocol.rpc import Fault, Request, parse_pdu
from kmsd.server import KmsServer
from tests.conftest import make_host, server_settings

SKU = products().sku_by_name("Windows Server 2022 Standard")
OTHER = "127.0.0.2"  # a second loopback address plays the other machine
TIMEOUT = 10.0


def test_admission_caps_allow_list_and_rate() -> None:
    adm: Admission[str] = Admission(
        max_connections=3,
        max_per_ip=2,
        allow=(ipaddress.ip_network("127.0.0.0/30"),),
        rate_per_ip=1.0,
    )
    assert adm.admit("127.0.0.1", "a", 0.0) == (None, None)
    assert adm.admit("127.0.0.1", "b", 0.0) == (None, None)
    assert adm.admit("127.0.0.1", "c", 0.0) == (Refusal.PER_ADDRESS_LIMIT, None)
    assert adm.admit("127.0.0.2", "d", 0.0) == (None, None)
    assert adm.admit("127.0.0.9", "e", 0.0) == (Refusal.NOT_ALLOWED, None)
    assert [adm.explain(r) for r in Refusal] == [
        "address outside the allowed networks",
        "2 connections already open from this address",
    ]
    assert adm.allowed("::ffff:127.0.0.1") and not adm.allowed("::1")
    # Rate: a burst of 2, then one per second.
    assert [adm.requested("127.0.0.2", "d", 0.0) for _ in range(3)] == [True, True, False]
    assert adm.requested("127.0.0.2", "d", 1.0) and not adm.requested("127.0.0.2", "d", 1.1)
    for address, conn in (("127.0.0.1", "a"), ("127.0.0.1", "b"), ("127.0.0.2", "d")):
        assert adm.release(address, conn)
    assert not adm.release("127.0.0.2", "d")  # once only
    assert adm.open == 0 and adm.admit("127.0.0.3", "f", 2.0) == (None, None)


def test_a_full_table_makes_room_from_the_address_with_most() -> None:
    adm: Admission[str] = Admission(max_connections=5, max_per_ip=4, allow=(), rate_per_ip=0.0)
    for conn in ("a1", "a2", "a3"):
        assert adm.admit("A", conn, 0.0) == (None, None)
    for conn in ("b1", "b2"):
        assert adm.admit("B", conn, 0.0) == (None, None)
    # Full. A has the most: its oldest that never sent a request gives way.
    assert adm.requested("A", "a1", 0.0)
    assert adm.admit("C", "c1", 0.0) == (None, "a2")
    # A and B have two each; B came to have two first, so B gives way.
    assert adm.admit("D", "d1", 0.0) == (None, "b1")
    # A newcomer whose address has as many as any other displaces its own.
    assert adm.admit("A", "a4", 0.0) == (None, "a3")
    # Only connections that sent a request left in A: the one idle longest goes.
    assert adm.requested("A", "a4", 1.0)
    assert adm.admit("A", "a5", 0.0) == (None, "a1")
    assert sorted(adm.connections()) == ["a4", "a5", "b2", "c1", "d1"] and adm.open == 5
    assert not adm.release("A", "a2") and adm.release("A", "a5")
    assert adm.admit("E", "e1", 0.0) == (None, None)


def test_an_ipv6_64_counts_as_one_address() -> None:
    assert source_of("127.0.0.1") == "127.0.0.1"
    assert source_of("::ffff:10.1.2.3") == "10.1.2.3"
    assert (
        source_of("2001:db8:1:2:aaaa::1")
        == source_of("2001:db8:1:2::ffff")
        == ("2001:db8:1:2::/64")
    )
    assert source_of("fe80::1%eth0") == "fe80::/64" and source_of("?") == "?"
    adm: Admission[str] = Admission(max_connections=10, max_per_ip=2, allow=(), rate_per_ip=1.0)
    assert adm.admit("2001:db8::1", "a", 0.0) == (None, None)
    assert adm.admit("2001:db8::2", "b", 0.0) == (None, None)
    assert adm.admit("2001:db8::3", "c", 0.0) == (Refusal.PER_ADDRESS_LIMIT, None)
    assert adm.admit("2001:db8:0:1::1", "d", 0.0) == (None, None)  # another /64
    key = source_of("2001:db8::9")
    assert [adm.requested(key, "a", 0.0) for _ in range(3)] == [True, True, False]
    assert adm.release(key, "a") and adm.release(source_of("2001:db8::2"), "b")
    assert adm.open == 1


async def start(**settings: object) -> KmsServer:
    srv = KmsServer(make_host(), server_settings(**settings))
    await srv.start()
    return srv


async def closed_by_server(source: str, srv: KmsServer) -> bool:
    reader, writer = await asyncio.open_connection(*srv.addresses[0], local_addr=(source, 0))
    try:
        writer.write(RpcClient().bind())
        data = await asyncio.wait_for(reader.read(1), TIMEOUT)
        return data == b""
    except ConnectionError:
        return True
    finally:
        writer.close()


async def activates(srv: KmsServer) -> bool:
    assert SKU
    conn = await KmsConnection.open(*srv.addresses[0])
    reply = await asyncio.wait_for(conn.activate(base_request(SKU)), TIMEOUT)
    await conn.close()
    return reply.base.count > 0


@pytest.mark.system
async def test_allow_list_refuses_other_networks() -> None:
    srv = await start(allow=(ipaddress.ip_network("127.0.0.1/32"),))
    try:
        assert await closed_by_server(OTHER, srv)
        assert await activates(srv)
    finally:
        await srv.stop()


@pytest.mark.system
async def test_per_address_cap_leaves_room_for_others() -> None:
    srv = await start(max_connections_per_ip=5)
    hogs = []
    try:
        for _ in range(5):
            hogs.append(await asyncio.open_connection(*srv.addresses[0], local_addr=(OTHER, 0)))
        assert await closed_by_server(OTHER, srv)  # the sixth from 127.0.0.2
        assert await activates(srv)  # 127.0.0.1 is still served
    finally:
        for _, writer in hogs:
            writer.close()
        await srv.stop()


@pytest.mark.system
async def test_rate_limit_answers_server_too_busy() -> None:
    assert SKU
    srv = await start(rate_per_ip=1.0)
    try:
        reader, writer = await asyncio.open_connection(*srv.addresses[0])
        client = RpcClient()
        writer.write(client.bind())
        await asyncio.wait_for(reader.read(4096), TIMEOUT)
        statuses = []
        for call_id in range(10, 14):
            stub = ndr.wrap_request(encode_request(base_request(SKU), iv=bytes(16)), True)
            writer.write(Request(call_id, 1, stub).encode())
            head = await asyncio.wait_for(reader.readexactly(16), TIMEOUT)
            pdu = parse_pdu(
                head + await reader.readexactly(int.from_bytes(head[8:10], "little") - 16)
            )
            statuses.append(pdu.status if isinstance(pdu, Fault) else 0)
        writer.close()
    finally:
        await srv.stop()
    assert statuses[:2] == [0, 0]  # the burst
    assert FaultStatus.SERVER_TOO_BUSY in statuses[2:]


@pytest.mark.system
async def test_slow_sender_is_closed_and_others_are_served() -> None:
    srv = await start(read_timeout=0.3, idle_timeout=30)
    try:
        reader, writer = await asyncio.open_connection(*srv.addresses[0], local_addr=(OTHER, 0))
        writer.write(RpcClient().bind()[:20])  # half a PDU, and then nothing
        assert await activates(srv)
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()
    finally:
        await srv.stop()


@pytest.mark.system
@pytest.mark.parametrize("hostile", [200])
async def test_legitimate_clients_activate_under_many_idle_connections(hostile: int) -> None:
    srv = await start(max_connections=hostile + 50, max_connections_per_ip=hostile + 50)
    idle = []
    try:
        for _ in range(hostile):
            idle.append(await asyncio.open_connection(*srv.addresses[0], local_addr=(OTHER, 0)))
        results = await asyncio.gather(*(activates(srv) for _ in range(20)))
        assert all(results)
    finally:
        for _, writer in idle:
            writer.close()
        await srv.stop()


async def bound_and_idle(srv: KmsServer, source: str) -> tuple[asyncio.StreamWriter, int]:
    """A connection that binds (so the server holds it) and then sends nothing; its port."""
    reader, writer = await asyncio.open_connection(*srv.addresses[0], local_addr=(source, 0))
    writer.write(RpcClient().bind())
    assert await asyncio.wait_for(reader.read(4096), TIMEOUT)  # bind_ack
    return writer, writer.get_extra_info("sockname")[1]


def server_ports(srv: KmsServer) -> set[int]:
    return {int(conn.peer.rsplit(":", 1)[1]) for conn in srv.connections}


@pytest.mark.system
async def test_idle_connections_cannot_lock_out_a_client() -> None:
    """Idle connections from four addresses take every slot: each new client takes the
    place of the oldest connection of the address with the most (here each of them in
    turn), which had not sent a request."""
    assert SKU
    srv = await start(max_connections=20, max_connections_per_ip=5)
    idle, clients = [], []
    try:
        for i in range(20):
            idle.append(await bound_and_idle(srv, f"127.0.0.{2 + i % 4}"))
        assert srv.admission.open == 20
        for _ in range(3):
            clients.append(await KmsConnection.open(*srv.addresses[0]))
        for conn in clients:
            reply = await asyncio.wait_for(conn.activate(base_request(SKU)), TIMEOUT)
            assert reply.base.count > 0
        ports = server_ports(srv)
        assert not ports & {port for _, port in idle[:3]}  # the oldest of .2, .3 and .4
        assert {port for _, port in idle[3:]} <= ports
        assert srv.metrics.evicted == 3 and srv.admission.open == 20
    finally:
        for conn in clients:
            await conn.close()
        for writer, _ in idle:
            writer.close()
        await srv.stop()


@pytest.mark.system
async def test_connections_idle_after_a_request_make_room_by_last_request() -> None:
    assert SKU
    srv = await start(max_connections=6, max_connections_per_ip=10)
    kept: list[KmsConnection] = []
    try:
        for _ in range(6):  # served once, then kept open and idle
            conn = await KmsConnection.open(*srv.addresses[0])
            await asyncio.wait_for(conn.activate(base_request(SKU)), TIMEOUT)
            kept.append(conn)
        await asyncio.wait_for(kept[0].activate(base_request(SKU)), TIMEOUT)  # now the newest
        newcomer = await KmsConnection.open(*srv.addresses[0])
        kept.append(newcomer)
        assert await asyncio.wait_for(newcomer.activate(base_request(SKU)), TIMEOUT)
        assert srv.metrics.evicted == 1
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(kept[1].activate(base_request(SKU)), TIMEOUT)
        assert await asyncio.wait_for(kept[0].activate(base_request(SKU)), TIMEOUT)
    finally:
        for conn in kept:
            await conn.close()
        await srv.stop()


@pytest.mark.system
async def test_a_full_address_is_refused_rather_than_evicting_others() -> None:
    srv = await start(max_connections=4, max_connections_per_ip=2)
    idle = []
    try:
        for source in ("127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"):
            idle.append(await bound_and_idle(srv, source))
        assert await closed_by_server("127.0.0.2", srv)  # at its own cap: refused
        assert srv.metrics.evicted == 0 and srv.admission.open == 4
    finally:
        for writer, _ in idle:
            writer.close()
        await srv.stop()


@settings(max_examples=300, derandomize=True)
@given(
    st.lists(
        st.tuples(st.sampled_from(["admit", "request", "close"]), st.integers(0, 5), st.integers()),
        max_size=80,
    )
)
def test_admission_bookkeeping_holds_under_any_sequence(
    steps: list[tuple[str, int, int]],
) -> None:
    """Whatever opens, sends and closes: the counts agree with the connections, the table
    never overflows, and a victim always comes from an address that had the most (or from
    the newcomer's own)."""
    adm: Admission[int] = Admission(max_connections=6, max_per_ip=4, allow=(), rate_per_ip=0.0)
    open_: dict[int, str] = {}
    for n, (action, who, pick) in enumerate(steps):
        address = f"10.0.0.{who}"
        if action == "admit":
            counts = {a: list(open_.values()).count(a) for a in set(open_.values())}
            refused, victim = adm.admit(address, n, 0.0)
            if refused is not None:
                assert counts.get(address, 0) == 4
                continue
            open_[n] = address
            if victim is not None:
                assert len(counts) and sum(counts.values()) == 6
                most = max(counts.values())
                assert open_[victim] == address or counts[open_[victim]] == most
                del open_[victim]
        elif open_:
            conn = sorted(open_)[pick % len(open_)]
            if action == "request":
                assert adm.requested(open_[conn], conn, 0.0)
            else:
                assert adm.release(open_.pop(conn), conn)
        assert adm.open == len(open_) <= 6
        assert sorted(adm.connections()) == sorted(open_)
        counts = {a: list(open_.values()).count(a) for a in set(open_.values())}
        assert adm._most == max(counts.values(), default=0)
