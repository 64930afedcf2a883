"""The host: policy, ePIDs, HWID, intervals, and what it refuses with which HRESULT."""

from __future__ import annotations

import dataclasses
import os
import uuid

import pytest

from kmsd.host import HostPolicy, KmsHost
from kmsd.protocol.client import base_request
from kmsd.protocol.constants import filetime, unix_time
from kmsd.protocol.epid import parse_epid
from kmsd.protocol.errors import HResult, KmsError
from kmsd.protocol.kms import BaseRequest, decode_response, encode_request
from kmsd.protocol.products import products
from tests.conftest import make_host

NOW = 1_795_000_000.0  # 2026-11-17
DB = products()
WIN = DB.sku_by_name("Windows 10/11 Enterprise")
SERVER = DB.sku_by_name("Windows Server 2019 Standard")
OFFICE = DB.sku_by_name("Office Professional Plus 2019")
HOME = DB.sku_by_name("Windows 10/11 Home")


def ask(host: KmsHost, base: BaseRequest, now: float = NOW) -> tuple[int, str, bytes]:
    iv = os.urandom(16)
    payload, activation = host.answer(encode_request(base, iv=iv), now)
    reply = decode_response(base, iv, payload)
    assert activation.count == reply.base.count
    return reply.base.count, reply.base.epid, reply.hwid


@pytest.mark.parametrize("major", [4, 5, 6])
def test_answer_verifies_and_counts(major: int) -> None:
    assert WIN and SERVER
    host = make_host()
    counts = [ask(host, base_request(WIN, major=major, now=NOW))[0] for _ in range(3)]
    counts.append(ask(host, base_request(SERVER, major=major, now=NOW))[0])
    assert counts == [1, 2, 3, 4]


def test_epid_is_valid_stable_and_per_host_key() -> None:
    assert WIN and SERVER and OFFICE
    host = make_host()
    _, win_epid, hwid = ask(host, base_request(WIN, now=NOW))
    _, server_epid, hwid2 = ask(host, base_request(SERVER, now=NOW))
    _, office_epid, _ = ask(host, base_request(OFFICE, now=NOW))
    assert win_epid == server_epid  # one Windows host key answers both
    assert office_epid != win_epid
    assert hwid == hwid2 == bytes.fromhex("0123456789abcdef")
    epid = parse_epid(office_epid)
    csvlk = OFFICE.kms.csvlk
    assert epid.group_id == csvlk.group_id
    assert csvlk.key_id_min <= epid.key_id <= csvlk.key_id_max
    assert csvlk.released <= epid.activated
    assert ask(host, base_request(OFFICE, now=NOW))[1] == office_epid


GOOD_EPID = "03612-00206-556-123727-03-1033-17763.0000-2972018"


@pytest.mark.parametrize(
    "text",
    [
        GOOD_EPID + "\n",  # `$` alone matches before a final newline
        "\n" + GOOD_EPID,
        GOOD_EPID.replace("03612", "\u0660\u0663\u0666\u0661\u0662"),  # Arabic-Indic digits
        GOOD_EPID.replace("2972018", "297\uff12\uff10\uff11\uff18"),  # fullwidth digits
        GOOD_EPID.replace("1033", "\u0967\u0966\u0969\u0969"),  # Devanagari digits
    ],
)
def test_epid_parser_takes_only_ascii_digits_and_nothing_after(text: str) -> None:
    assert parse_epid(GOOD_EPID).activated.isoformat() == "2018-10-24"
    with pytest.raises(ValueError, match="does not have the form"):
        parse_epid(text)


def test_epid_override_per_kms_id_and_intervals() -> None:
    assert WIN
    host = make_host(HostPolicy(activation_interval=30, renewal_interval=1440))
    host.identity.overrides[WIN.kms.id] = GOOD_EPID
    base = base_request(WIN, now=NOW)
    iv = os.urandom(16)
    payload, _ = host.answer(encode_request(base, iv=iv), NOW)
    reply = decode_response(base, iv, payload).base
    assert reply.epid == GOOD_EPID
    assert (reply.activation_interval, reply.renewal_interval) == (30, 1440)


def refused(host: KmsHost, base: BaseRequest, now: float = NOW) -> KmsError:
    with pytest.raises(KmsError) as info:
        host.answer(encode_request(base, iv=os.urandom(16)), now)
    return info.value


def test_strict_refuses_retail_unknown_and_mismatched_products() -> None:
    assert WIN and HOME
    strict = make_host(HostPolicy(strict=True))
    assert refused(strict, base_request(HOME, now=NOW)).hresult == HResult.KMS_ID_MISMATCH
    unknown = dataclasses.replace(base_request(WIN, now=NOW), kms_id=uuid.uuid4().bytes_le)
    assert refused(strict, unknown).hresult == HResult.KMS_ID_MISMATCH
    office_app = dataclasses.replace(
        base_request(WIN, now=NOW),
        application_id=uuid.UUID("0ff1ce15-a989-479d-af46-f275c6370663").bytes_le,
    )
    assert refused(strict, office_app).hresult == HResult.KMS_ID_MISMATCH
    # Not strict: all of these are served, the unknown one flagged for the log.
    lenient = make_host()
    for base in (base_request(HOME, now=NOW), unknown, office_app):
        _, activation = lenient.answer(encode_request(base, iv=os.urandom(16)), NOW)
        assert activation.known == (base is not unknown)


def test_clock_skew_limit() -> None:
    assert WIN
    host = make_host(HostPolicy(max_clock_skew=4 * 3600))
    old = base_request(WIN, now=NOW - 5 * 3600)
    assert refused(host, old).hresult == HResult.INVALID_TIMESTAMP
    assert ask(host, base_request(WIN, now=NOW - 3 * 3600))[0] == 1
    assert abs(unix_time(filetime(NOW)) - NOW) < 1e-6


def test_n_policy_above_1000_is_invalid_data() -> None:
    assert WIN
    host = make_host()
    base = base_request(WIN, now=NOW, required_count=1001)
    assert refused(host, base).hresult == HResult.INVALID_DATA


@pytest.mark.parametrize("major", [4, 5, 6])
def test_bad_mac_or_padding_is_invalid_data_unless_verification_is_off(major: int) -> None:
    assert WIN
    base = base_request(WIN, major=major, now=NOW)
    message = bytearray(encode_request(base, iv=os.urandom(16)))
    message[-1] ^= 0x01  # V4: the MAC; V5/V6: the padding block
    with pytest.raises(KmsError) as info:
        make_host().answer(bytes(message), NOW)
    assert info.value.hresult == HResult.INVALID_DATA
    lenient = make_host(HostPolicy(verify=False))
    if major == 4:
        payload, activation = lenient.answer(bytes(message), NOW)
        assert activation.count == 1 and payload
    else:  # the padding is garbage but the base request decrypts
        _, activation = lenient.answer(bytes(message), NOW)
        assert activation.request.client_machine_id == base.client_machine_id


@pytest.mark.parametrize("version", [(7, 0), (6, 1), (3, 0)])
def test_unsupported_versions_are_invalid_data(version: tuple[int, int]) -> None:
    assert WIN
    message = bytearray(encode_request(base_request(WIN, now=NOW), iv=os.urandom(16)))
    message[0:4] = version[1].to_bytes(2, "little") + version[0].to_bytes(2, "little")
    with pytest.raises(KmsError) as info:
        make_host().answer(bytes(message), NOW)
    assert info.value.hresult == HResult.INVALID_DATA
    assert f"{version[0]}.{version[1]}" in info.value.reason


def test_short_request_is_invalid_data() -> None:
    assert WIN
    message = encode_request(base_request(WIN, now=NOW), iv=os.urandom(16))
    with pytest.raises(KmsError) as info:
        make_host().answer(message[:100], NOW)
    assert info.value.hresult == HResult.INVALID_DATA


def test_products_and_overrides_hold_when_asked_again() -> None:
    """The host remembers what the product database says of each ID triple; what a
    reload changes (ePID overrides) still applies to the next request."""
    assert WIN
    host = make_host()
    unknown_sku = dataclasses.replace(base_request(WIN, now=NOW), sku_id=uuid.UUID(int=7).bytes_le)
    first, again = (
        host.answer(encode_request(unknown_sku, iv=os.urandom(16)), NOW)[1] for _ in "12"
    )
    assert (again.product, again.application, again.known) == (
        first.product,
        first.application,
        first.known,
    )
    assert again.product == f"unknown SKU {uuid.UUID(int=7)} of {WIN.kms.name}"
    override = "03612-00206-556-123727-03-1033-17763.0000-2972018"
    host.identity.overrides = {WIN.kms.id: override}  # as a reload does
    assert ask(host, base_request(WIN, now=NOW))[1] == override
    host.identity.overrides = {}
    assert ask(host, base_request(WIN, now=NOW))[1] != override
