"""Admission and limits: allowed networks, per-address caps, request rate, slow senders."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from kmsclient.session import KmsConnection, RpcClient, base_request
from kmsd.limits import Admission
from kmsd.protocol import ndr
from kmsd.protocol.errors import FaultStatus
from kmsd.protocol.kms import encode_request
from kmsd.protocol.products import products
from kmsd.protocol.rpc import Fault, Request, parse_pdu
from kmsd.server import KmsServer, ServerSettings
from tests.conftest import LOOPBACK, make_host

SKU = products().sku_by_name("Windows Server 2022 Standard")
OTHER = "127.0.0.2"  # a second loopback address plays the other machine
TIMEOUT = 10.0


def test_admission_caps_allow_list_and_rate() -> None:
    adm = Admission(
        max_connections=3,
        max_per_ip=2,
        allow=(ipaddress.ip_network("127.0.0.0/30"),),
        rate_per_ip=1.0,
    )
    assert adm.admit("127.0.0.1", 0.0) is None
    assert adm.admit("127.0.0.1", 0.0) is None
    assert "from this address" in str(adm.admit("127.0.0.1", 0.0))
    assert adm.admit("127.0.0.2", 0.0) is None
    assert "3 connections already open" in str(adm.admit("127.0.0.3", 0.0))
    assert "outside the allowed" in str(adm.admit("127.0.0.9", 0.0))
    assert adm.allowed("::ffff:127.0.0.1") and not adm.allowed("::1")
    # Rate: a burst of 2, then one per second.
    assert [adm.take("127.0.0.2", 0.0) for _ in range(3)] == [True, True, False]
    assert adm.take("127.0.0.2", 1.0) and not adm.take("127.0.0.2", 1.1)
    for address in ("127.0.0.1", "127.0.0.1", "127.0.0.2"):
        adm.release(address)
    assert adm.open == 0 and adm.admit("127.0.0.3", 2.0) is None


async def start(**settings: object) -> KmsServer:
    srv = KmsServer(make_host(), ServerSettings(listen=((LOOPBACK, 0),), **settings))  # type: ignore[arg-type]
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


async def test_allow_list_refuses_other_networks() -> None:
    srv = await start(allow=(ipaddress.ip_network("127.0.0.1/32"),))
    try:
        assert await closed_by_server(OTHER, srv)
        assert await activates(srv)
    finally:
        await srv.stop()


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
