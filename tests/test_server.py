"""kmsd over real TCP on loopback: in-process and as the `kmsd` command."""

from __future__ import annotations

import asyncio
import socket

import pytest

from kmsclient.session import KmsConnection
from kmsd.protocol.client import BindOptions, base_request
from kmsd.protocol.products import products
from kmsd.server import KmsServer
from tests.conftest import (
    LOOPBACK,
    KmsdProcess,
    make_host,
    run_kmsd,
    server_settings,
    start_kmsd,
    stop_kmsd,
)

DB = products()
WIN = DB.sku_by_name("Windows 10/11 Enterprise")
SERVER = DB.sku_by_name("Windows Server 2022 Standard")
OFFICE = DB.sku_by_name("Office LTSC Professional Plus 2021")
TIMEOUT = 10.0


def addr(server: KmsServer) -> tuple[str, int]:
    return server.addresses[0]


@pytest.mark.parametrize("major", [4, 5, 6])
@pytest.mark.parametrize(
    "options", [BindOptions(), BindOptions(ndr64=False, btfn=False, multiplex=False)]
)
async def test_activation_counts_over_one_kept_connection(
    server: KmsServer, major: int, options: BindOptions
) -> None:
    assert WIN and SERVER
    conn = await KmsConnection.open(*addr(server), options)
    counts = []
    for sku in (WIN, WIN, WIN, SERVER):
        reply = await asyncio.wait_for(conn.activate(base_request(sku, major=major)), TIMEOUT)
        counts.append(reply.base.count)
    await conn.close()
    assert counts == [1, 2, 3, 4]


async def test_ndr32_and_ndr64_calls_on_one_connection(server: KmsServer) -> None:
    assert OFFICE
    conn = await KmsConnection.open(*addr(server))
    assert set(conn.rpc.contexts.values()) == {True}  # NDR64 accepted, NDR32 refused
    first = await conn.activate(base_request(OFFICE), prefer_ndr64=True)
    assert first.base.count == 1
    await conn.close()
    conn = await KmsConnection.open(*addr(server), BindOptions(ndr64=False))
    second = await conn.activate(base_request(OFFICE), prefer_ndr64=False)
    assert second.base.count == 2 and second.base.epid == first.base.epid
    await conn.close()


async def test_new_connection_per_activation_like_windows(server: KmsServer) -> None:
    assert SERVER
    counts = []
    for _ in range(6):
        conn = await KmsConnection.open(*addr(server))
        counts.append((await conn.activate(base_request(SERVER))).base.count)
        await conn.close()
    assert counts == [1, 2, 3, 4, 5, 6]


async def read_until_eof(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), TIMEOUT)


async def test_idle_connection_is_closed() -> None:
    srv = KmsServer(make_host(), server_settings(idle_timeout=0.2))
    await srv.start()
    try:
        reader, writer = await asyncio.open_connection(*addr(srv))
        assert await read_until_eof(reader) == b""  # the server closed it
        writer.close()
    finally:
        await srv.stop()


async def test_drained_returns_when_the_last_connection_closes() -> None:
    """stop() closes the open connections; drained() wakes at the last close, not at its
    timeout (which aborts what is left)."""
    assert WIN
    srv = KmsServer(make_host(), server_settings())
    await srv.start()
    conn = await KmsConnection.open(*addr(srv))
    assert (await conn.activate(base_request(WIN))).base.count == 1
    await srv.stop()
    assert srv.connections  # closing, not closed yet
    # every close happens within a few turns of the loop; waiting 100 s would mean a stall
    async with asyncio.timeout(100):
        await srv.drained(timeout=3600)
    assert not srv.connections and srv.all_closed is None
    assert await read_until_eof(conn.reader) == b""  # closed in order, not aborted
    await conn.close()


async def test_a_connection_beyond_the_limit_takes_the_place_of_the_oldest_idle() -> None:
    assert WIN
    srv = KmsServer(make_host(), server_settings(max_connections=2))
    await srv.start()
    try:
        a = await KmsConnection.open(*addr(srv))
        b = await KmsConnection.open(*addr(srv))
        c = await KmsConnection.open(*addr(srv))  # a, idle longest, gave way
        assert (await b.activate(base_request(WIN))).base.count == 1
        assert (await c.activate(base_request(WIN))).base.count == 2
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(a.activate(base_request(WIN)), TIMEOUT)
        for conn in (a, b, c):
            await conn.close()
    finally:
        await srv.stop()


async def test_garbage_connection_does_not_disturb_others(server: KmsServer) -> None:
    assert WIN
    good = await KmsConnection.open(*addr(server))
    reader, writer = await asyncio.open_connection(*addr(server))
    writer.write(b"\x05\x00\x0b\x03\x10\x00\x00\x00\xff\xff" + b"garbage" * 10)
    assert await read_until_eof(reader) == b""  # frag_length beyond the limit: closed
    writer.close()
    assert (await good.activate(base_request(WIN))).base.count == 1
    await good.close()


async def test_ipv6_loopback() -> None:
    assert WIN
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")
    srv = KmsServer(make_host(), server_settings(listen=(("::1", 0),)))
    try:
        await srv.start()
    except OSError as exc:
        pytest.skip(f"::1 not available: {exc}")
    try:
        conn = await KmsConnection.open(*addr(srv))
        assert (await conn.activate(base_request(WIN))).base.count == 1
        await conn.close()
    finally:
        await srv.stop()


async def test_daemon_logs_each_activation_and_stops_cleanly_on_sigterm(
    kmsd_process: KmsdProcess,
) -> None:
    assert WIN
    conn = await KmsConnection.open(kmsd_process.host, kmsd_process.port)
    base = base_request(WIN, workstation="lab-pc-07.lab.test")
    reply = await conn.activate(base)
    await conn.close()
    entry = await asyncio.to_thread(kmsd_process.read_log_until, "activation")
    assert entry["cmid"] == base.cmid_text
    assert entry["workstation"] == "lab-pc-07.lab.test"
    assert entry["application"] == "Windows"
    assert entry["product"] == "Windows 10/11 Enterprise"
    assert entry["protocol"] == "6.0"
    assert entry["count"] == reply.base.count == 1
    assert str(entry["client"]).startswith("127.0.0.1:")
    assert stop_kmsd(kmsd_process) == 0
    assert [e["event"] for e in kmsd_process.log][-2:] == ["stopping", "stopped"]


def test_help_explains_the_options() -> None:
    result = run_kmsd("--help")
    assert result.returncode == 0
    for option in ("--listen", "--strict", "--epid", "--hwid", "--log-format", "--no-ndr64"):
        assert option in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "127.0.0.1:99999"], "port must be 0-65535"),
        (["--hwid", "xyz"], "HWID must be 16 hex digits"),
        (["--epid", "Windows 10/11 Enterprise=not-an-epid"], "does not have the form"),
        (
            ["--epid", "No Such Product=03612-00206-556-123727-03-1033-17763.0000-2972018"],
            "unknown product 'No Such Product' (a KMS ID, KMS group or product name)",
        ),
        (["--max-pdu", "100"], "must be between 1432 and 65535"),
    ],
)
def test_bad_arguments_are_named(args: list[str], message: str) -> None:
    result = run_kmsd(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind((LOOPBACK, 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_kmsd(
            "--listen", f"{LOOPBACK}:{port}", "--log-format", "json", "--db", ":memory:"
        )
    assert result.returncode == 1
    assert f"cannot listen on {LOOPBACK}:{port}" in result.stderr
    assert "Traceback" not in result.stderr


async def test_epid_and_hwid_options_reach_the_wire() -> None:
    assert WIN
    epid = "03612-00206-556-123727-03-1033-17763.0000-2972018"
    kmsd = start_kmsd(
        "--hwid",
        "3A1C049600B60076",
        "--epid",
        f"Windows 10/11 Enterprise={epid}",
        "--activation-interval",
        "60",
        "--renewal-interval",
        "2880",
    )
    try:
        conn = await KmsConnection.open(kmsd.host, kmsd.port)
        reply = await conn.activate(base_request(WIN, major=6))
        await conn.close()
    finally:
        stop_kmsd(kmsd)
    assert reply.base.epid == epid
    assert reply.hwid.hex().upper() == "3A1C049600B60076"
    assert (reply.base.activation_interval, reply.base.renewal_interval) == (60, 2880)
