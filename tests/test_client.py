"""The client side of the wire core (kmsd.protocol.client, kmsd.protocol.checks), sans-IO:
the response stub checks and the client state machine against the server connection."""

from __future__ import annotations

import pytest

from kmsd.protocol import ndr
from kmsd.protocol.checks import check_response_stub
from kmsd.protocol.client import BindOptions, HostRefused, RpcClient, base_request, prepare
from kmsd.protocol.connection import AssociationGroups, Call, Send, ServerConnection
from kmsd.protocol.errors import HResult
from kmsd.protocol.products import products

SKU = products().sku_by_name("Windows 10/11 Enterprise")


@pytest.mark.parametrize("ndr64", [False, True])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 258])
def test_a_stub_as_kmsd_writes_it_passes_without_warnings(ndr64: bool, size: int) -> None:
    payload = bytes(i % 251 + 1 for i in range(size))
    stub = ndr.wrap_response(payload, ndr64)
    assert ndr.response_length(size, ndr64) == len(stub)
    warnings: list[str] = []
    assert check_response_stub(stub, len(stub), ndr64, warnings) == (payload, 0)
    assert warnings == []


@pytest.mark.parametrize("ndr64", [False, True])
def test_response_stub_warnings_like_vlmcs(ndr64: bool) -> None:
    payload = b"\x01\x02\x03\x04\x05"  # three pad bytes follow it
    stub = bytearray(ndr.wrap_response(payload, ndr64))
    head = len(stub) - len(payload) - 3 - 4
    stub[head + len(payload) + 1] = 0xAA  # a pad byte that is not zero
    stub += b"\x00\x00"  # two bytes after the return value
    warnings: list[str] = []
    assert check_response_stub(bytes(stub), 7, ndr64, warnings) == (payload, 0)
    expected = ndr.response_length(len(payload), ndr64)
    assert warnings == [
        f"alloc_hint 7, expected {expected}",
        "NDR pad bytes are not zero",
        "2 bytes after the return value",
    ]


@pytest.mark.parametrize("options", [BindOptions(), BindOptions(ndr64=False, btfn=False)])
def test_client_and_server_connection_agree(options: BindOptions) -> None:
    """The two roles of the core, fed each other's bytes, with no socket in between."""
    assert SKU
    server = ServerConnection(port=1688, groups=AssociationGroups(1))
    client = RpcClient(options)
    (ack,) = server.feed(client.bind())
    assert isinstance(ack, Send) and ack.problem is None
    client.on_bind_ack(ack.data)
    # kmsd accepts NDR64 alone when it is offered; vlmcs then asks for NDR32 too.
    assert client.contexts == ({1: True} if options.ndr64 else {0: False})
    assert client.needs_alter_context == options.ndr64
    if client.needs_alter_context:
        (resp,) = server.feed(client.alter_context())
        assert isinstance(resp, Send)
        client.on_alter_context_resp(resp.data)
        assert client.contexts == {0: False, 1: True}
    prepared = prepare(base_request(SKU))
    pdu, ctx_id, ndr64 = client.request(prepared.message, prefer_ndr64=True)
    (call,) = server.feed(pdu)
    assert isinstance(call, Call) and call.payload == prepared.message
    assert (call.context_id, call.ndr64) == (ctx_id, ndr64)
    with pytest.raises(HostRefused) as refused:
        client.on_response(call.reply_error(HResult.INVALID_DATA), ctx_id, ndr64)
    assert refused.value.status == HResult.INVALID_DATA
    assert client.warnings == []
