"""Fuzz targets: each takes arbitrary bytes and must end in one of its defined outcomes.

A target returns normally or raises one of the exceptions its input may legitimately
cause (`EXPECTED`); anything else is a bug. The same functions run under atheris
(fuzz/run.py) and, for the crash corpus and a smoke run, under pytest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dnslib

from kmsclient.discovery import _addresses_in, matching_reply, order, srv_records
from kmsd import config
from kmsd.cache import MemoryCounter
from kmsd.dns.responder import Zone, parse_kms
from kmsd.host import HostIdentity, KmsHost
from kmsd.protocol import ndr
from kmsd.protocol.connection import AssociationGroups, Call, Close, Send, ServerConnection
from kmsd.protocol.errors import KmsError, NotGenuine, StubError
from kmsd.protocol.kms import BaseRequest, decode_request, decode_response
from kmsd.protocol.products import products
from kmsd.protocol.rpc import PduError, parse_pdu

_DB = products()
_IDENTITY = HostIdentity(hwid=bytes(8))
_IDENTITY.complete(_DB, lambda n: bytes(n), 1_795_000_000.0)
_HOST = KmsHost(MemoryCounter(frozenset(_DB.applications)), _IDENTITY, random=os.urandom)
_CONFIG_DIR = Path(tempfile.mkdtemp(prefix="kmsd-fuzz-"))


def rpc_pdu(data: bytes) -> None:
    """The PDU parser: a PDU or PduError; whatever parses encodes again."""
    try:
        pdu = parse_pdu(data)
    except PduError:
        return
    encode = getattr(pdu, "encode", None)
    if encode is not None:
        encode()


def connection(data: bytes) -> None:
    """The server side of a connection never raises; every reply parses; calls answer."""
    conn = ServerConnection(port=1688, groups=AssociationGroups(1))
    events = conn.feed(data[: len(data) // 2]) + conn.feed(data[len(data) // 2 :])
    for event in events:
        if isinstance(event, Send):
            assert event.data
        elif isinstance(event, Call):
            try:
                payload, _ = _HOST.answer(event.payload, time.time(), "fuzz")
                event.reply(payload)
            except KmsError as exc:
                event.reply_error(exc.hresult)
        else:
            assert isinstance(event, Close)


def ndr_stubs(data: bytes) -> None:
    """NDR32 and NDR64 stubs, request and response side."""
    for ndr64 in (False, True):
        for unwrap in (ndr.unwrap_request, ndr.unwrap_response):
            with contextlib.suppress(StubError):
                unwrap(data, ndr64)


def _kms(major: int) -> Callable[[bytes], None]:
    version = (0).to_bytes(2, "little") + major.to_bytes(2, "little")

    def target(data: bytes) -> None:
        message = version + data
        try:
            request = decode_request(message, verify=bool(data[:1]) and data[0] & 1 == 0)
        except KmsError:
            return
        try:
            payload, _ = _HOST.answer(message, time.time(), "fuzz")
        except KmsError:
            return
        decode_response(request.base, request.iv, payload)

    target.__name__ = f"kms_v{major}"
    target.__doc__ = f"The V{major} request decoder and the host's answer to it."
    return target


kms_v4, kms_v5, kms_v6 = _kms(4), _kms(5), _kms(6)


def kms_response(data: bytes) -> None:
    """The client's decoder of a response: verified or NotGenuine."""
    if len(data) < 236 + 16:
        return
    base = BaseRequest.decode(data[:236].ljust(236, b"\0"))
    for major in (4, 5, 6):
        request = dataclasses.replace(base, major=major)
        with contextlib.suppress(NotGenuine):
            decode_response(request, data[236:252], data[252:])


def config_file(data: bytes) -> None:
    """The configuration loader: options or ConfigError."""
    path = _CONFIG_DIR / "fuzz.toml"
    path.write_bytes(data)
    with contextlib.suppress(config.ConfigError):
        config.read_file(path)


_SRV_NAME = "_vlmcs._tcp.lab.test"
_ZONE = Zone(
    "lab.test",
    [parse_kms("127.0.0.1:1688,priority=0,weight=10"), parse_kms("[::1]:1688,priority=1,weight=0")],
)


def dns_reply(data: bytes) -> None:
    """The client's handling of a DNS reply: matched to its query or dropped; then the SRV
    records, their addresses and the RFC 2782 order."""
    qid = int.from_bytes(data[:2], "big") if len(data) >= 2 else 0
    reply = matching_reply(data, qid, _SRV_NAME, "SRV")
    if reply is None:
        return
    records = srv_records(reply, _SRV_NAME)
    for record in records:
        _addresses_in(reply.ar, {record.target})
    order(records, random.Random(0))


def dns_query(data: bytes) -> None:
    """The lab DNS responder: a reply that parses, or no reply."""
    for udp in (True, False):
        answer = _ZONE.answer(data, udp=udp)
        if answer is not None:
            dnslib.DNSRecord.parse(answer)


TARGETS: dict[str, Callable[[bytes], None]] = {
    t.__name__: t
    for t in (
        rpc_pdu,
        connection,
        ndr_stubs,
        kms_v4,
        kms_v5,
        kms_v6,
        kms_response,
        config_file,
        dns_reply,
        dns_query,
    )
}
