"""KMS messages V4, V5 and V6: base request/response and their envelopes (docs/protocol.md,
"KMS messages").

Both directions live here, so the host and the client share one definition of every
structure. Nothing here draws randomness: salts and IVs are arguments.
"""

from __future__ import annotations

import functools
import struct
from codecs import utf_16_le_decode as _utf16le_decode
from dataclasses import dataclass, field
from uuid import UUID

from .crypto import (
    BLOCK,
    E5,
    E6,
    BlockCipher,
    mac4,
    pkcs7_pad,
    pkcs7_unpad,
    sha256,
    v6_mac,
    xor16,
)
from .errors import HResult, KmsError, NotGenuine

_VERSION = struct.Struct("<HH")  # minor, major: how every KMS message begins
_BASE_REQUEST = struct.Struct("<HHIII16s16s16s16sIQ16s128s")
BASE_REQUEST_SIZE = _BASE_REQUEST.size  # 236
_RESPONSE_HEAD = struct.Struct("<HHI")  # version, ePIDSize
_RESPONSE_TAIL = struct.Struct("<16sQIII")  # CMID, RequestTime, Count, intervals
MAX_EPID_SIZE = 128
WORKSTATION_SIZE = 128
V4_REQUEST_SIZE = BASE_REQUEST_SIZE + BLOCK  # 252
V56_REQUEST_SIZE = 4 + BLOCK + BASE_REQUEST_SIZE + 4  # 260
_REQUEST_PAD = b"\x04" * 4
SUPPORTED_MAJORS = (4, 5, 6)


_GUID_WIRE = struct.Struct("<IHH8s")  # a GUID as sent: its first three fields little-endian
_GUID_TEXT = struct.Struct(">IHH8s")  # the same in the order its text is written


def guid_text(raw: bytes) -> str:
    """The canonical text of a GUID sent as `raw` (16 bytes, wire order), as
    str(UUID(bytes_le=raw)) writes it, without making the UUID (per-request path)."""
    h = _GUID_TEXT.pack(*_GUID_WIRE.unpack(raw)).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_PRODUCT_UUIDS: dict[bytes, UUID] = {}
_MAX_PRODUCT_UUIDS = 4096


def product_uuid(raw: bytes) -> UUID:
    """UUID(bytes_le=raw) of an application, SKU or KMS ID, to look it up in the product
    database: a few hundred values in any lab, made once each (a peer sending random ones
    only fills the bounded table)."""
    uuid = _PRODUCT_UUIDS.get(raw)
    if uuid is None:
        uuid = UUID(bytes_le=raw)
        if len(_PRODUCT_UUIDS) < _MAX_PRODUCT_UUIDS:
            _PRODUCT_UUIDS[raw] = uuid
    return uuid


def _utf16z_decode(raw: bytes) -> str:
    """Decode UTF-16LE up to the first NUL code unit (bytes after it may be garbage:
    decoding them cannot change what comes before, as `replace` never raises and a
    NUL code unit never completes a surrogate pair)."""
    # (the codec's function itself: bytes.decode("utf-16-le") finds it in the registry and
    # calls it through encodings.utf_16_le, a Python function, each time)
    return _utf16le_decode(raw[: len(raw) & ~1], "replace", True)[0].partition("\x00")[0]


@dataclass(slots=True)  # made per request; not frozen, whose __init__ costs 3x
class BaseRequest:
    """The 236-byte base request, the same for every protocol version (docs/protocol.md).

    Its GUIDs are bytes as sent (16, wire order: UUID.bytes_le): that is what the host
    compares, hashes and counts by; UUID(bytes_le=...) and guid_text make them readable."""

    major: int
    minor: int
    is_vm: int
    license_status: int
    binding_expiration: int
    application_id: bytes
    sku_id: bytes
    kms_id: bytes
    client_machine_id: bytes
    required_count: int
    request_time: int
    previous_client_machine_id: bytes
    workstation: str
    _cmid_text: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def cmid_text(self) -> str:
        """The client machine ID's canonical text, made once (the store and the log line
        both need it)."""
        text = self._cmid_text
        if text is None:
            text = self._cmid_text = guid_text(self.client_machine_id)
        return text

    def encode(self) -> bytes:
        name = self.workstation.encode("utf-16-le") + b"\x00\x00"
        if len(name) > WORKSTATION_SIZE:
            raise ValueError("workstation name longer than 63 UTF-16 code units")
        return _BASE_REQUEST.pack(
            self.minor,
            self.major,
            self.is_vm,
            self.license_status,
            self.binding_expiration,
            self.application_id,
            self.sku_id,
            self.kms_id,
            self.client_machine_id,
            self.required_count,
            self.request_time,
            self.previous_client_machine_id,
            name,
        )

    @classmethod
    def decode(cls, raw: bytes) -> BaseRequest:
        (
            minor,
            major,
            vm,
            status,
            expiration,
            app,
            sku,
            kms,
            cmid,
            required,
            time,
            previous,
            name,
        ) = _BASE_REQUEST.unpack_from(raw)
        # Positional: the field order, cheaper than keywords on the per-request path.
        return cls(
            major,
            minor,
            vm,
            status,
            expiration,
            app,
            sku,
            kms,
            cmid,
            required,
            time,
            previous,
            _utf16z_decode(name),
        )


@functools.lru_cache(maxsize=64)  # a host answers with a handful of ePIDs
def _epid_field(epid: str) -> bytes:
    field = epid.encode("utf-16-le") + b"\x00\x00"
    if len(field) > MAX_EPID_SIZE:
        raise ValueError("ePID longer than 63 UTF-16 code units")
    return field


@dataclass(slots=True)  # made per request; not frozen, whose __init__ costs 3x
class BaseResponse:
    """The base response, 44 bytes plus the ePID (docs/protocol.md)."""

    major: int
    minor: int
    epid: str
    client_machine_id: bytes  # as sent (16, wire order), like BaseRequest's
    request_time: int
    count: int
    activation_interval: int
    renewal_interval: int

    def encode(self) -> bytes:
        epid = _epid_field(self.epid)
        return (
            _RESPONSE_HEAD.pack(self.minor, self.major, len(epid))
            + epid
            + _RESPONSE_TAIL.pack(
                self.client_machine_id,
                self.request_time,
                self.count,
                self.activation_interval,
                self.renewal_interval,
            )
        )

    @classmethod
    def decode(cls, data: bytes) -> tuple[BaseResponse, int]:
        """Decode a base response at the start of `data`; returns it and its length."""
        if len(data) < _RESPONSE_HEAD.size:
            raise NotGenuine("size", f"{len(data)} bytes cannot hold a base response")
        minor, major, epid_size = _RESPONSE_HEAD.unpack_from(data)
        if epid_size > MAX_EPID_SIZE or epid_size < 2 or epid_size % 2:
            raise NotGenuine("epid", f"ePID size {epid_size} is not an even 2..{MAX_EPID_SIZE}")
        end = _RESPONSE_HEAD.size + epid_size + _RESPONSE_TAIL.size
        if len(data) < end:
            raise NotGenuine("size", f"{len(data)} bytes cannot hold a base response of {end}")
        raw_epid = data[_RESPONSE_HEAD.size : _RESPONSE_HEAD.size + epid_size]
        units = [raw_epid[i : i + 2] for i in range(0, epid_size, 2)]
        if units[-1] != b"\x00\x00" or b"\x00\x00" in units[:-1]:
            raise NotGenuine("epid", "ePID is not exactly one NUL-terminated string")
        cmid, time, count, activation, renewal = _RESPONSE_TAIL.unpack_from(
            data, _RESPONSE_HEAD.size + epid_size
        )
        base = cls(
            major=major,
            minor=minor,
            epid=raw_epid[:-2].decode("utf-16-le", errors="replace"),
            client_machine_id=cmid,
            request_time=time,
            count=count,
            activation_interval=activation,
            renewal_interval=renewal,
        )
        return base, end


def _cipher(major: int) -> BlockCipher:
    return E6 if major >= 6 else E5


@dataclass(slots=True)  # made per request; not frozen, whose __init__ costs 3x
class KmsRequest:
    """A decoded request as the host sees it."""

    major: int
    minor: int
    base: BaseRequest
    iv: bytes = b""  # V5/V6: the client's IV
    dc: bytes = b""  # V5/V6: Dk(IV), the raw block decryption of the client's IV
    product_ids: bytes = b""  # the application, SKU and KMS IDs as sent (48 bytes)


def request_version(message: bytes) -> tuple[int, int] | None:
    """The (major, minor) version a KMS request claims; None when it is too short to say."""
    if len(message) < _VERSION.size:
        return None
    minor, major = _VERSION.unpack_from(message)
    return major, minor


def decode_request(message: bytes, *, verify: bool = True) -> KmsRequest:
    """Decode a KMS request; `verify` checks the V4 MAC, V5/V6 padding and inner version."""
    if len(message) < 4:
        raise KmsError(HResult.INVALID_DATA, f"request of {len(message)} bytes has no version")
    minor, major = _VERSION.unpack_from(message)
    if major not in SUPPORTED_MAJORS or minor != 0:
        raise KmsError(HResult.INVALID_DATA, f"unsupported protocol version {major}.{minor}")
    need = V4_REQUEST_SIZE if major == 4 else V56_REQUEST_SIZE
    if len(message) < need:
        raise KmsError(
            HResult.INVALID_DATA,
            f"V{major} request of {len(message)} bytes, at least {need} needed",
        )
    if major == 4:
        raw = message[:BASE_REQUEST_SIZE]
        if verify and mac4(raw) != message[BASE_REQUEST_SIZE:V4_REQUEST_SIZE]:
            raise KmsError(HResult.INVALID_DATA, "V4 request MAC does not verify")
        iv = dc = b""
    else:
        cipher = _cipher(major)
        iv = message[4:20]
        plain = cipher.cbc_decrypt(iv, message[20:V56_REQUEST_SIZE])
        if verify and plain[BASE_REQUEST_SIZE:] != _REQUEST_PAD:
            raise KmsError(HResult.INVALID_DATA, f"V{major} request padding is wrong (bad key?)")
        raw = plain[:BASE_REQUEST_SIZE]
        dc = cipher.decrypt_block(iv)
    base = BaseRequest.decode(raw)
    if verify and (base.major, base.minor) != (major, minor):
        raise KmsError(
            HResult.INVALID_DATA,
            f"inner version {base.major}.{base.minor} differs from outer {major}.{minor}",
        )
    # raw[16:64]: application, SKU and KMS IDs (a literal slice: mypyc mistakes a slice object
    # for an index)
    return KmsRequest(major, minor, base, iv, dc, raw[16:64])


def encode_response(
    request: KmsRequest,
    base: BaseResponse,
    *,
    salt: bytes,
    response_iv: bytes = b"",
    hwid: bytes = bytes(8),
) -> bytes:
    """Wrap a base response for the request's version. `salt` is R (V5/V6); `response_iv`
    is W (V6 only; V5 answers with the client's IV)."""
    body = base.encode()
    if request.major == 4:
        return body + mac4(body)
    version = _VERSION.pack(request.minor, request.major)
    extra = xor16(salt, request.dc) + sha256(salt)
    if request.major == 5:
        return version + request.iv + E5.cbc_encrypt(request.iv, pkcs7_pad(body + extra))
    p0 = E6.decrypt_block(response_iv)
    signed = body + extra + hwid + request.dc
    signed += v6_mac(base.request_time, p0 + signed)
    return version + response_iv + E6.cbc_encrypt(response_iv, pkcs7_pad(signed))


def encode_request(base: BaseRequest, *, iv: bytes = b"") -> bytes:
    """Client side: wrap a base request; `iv` is the random client IV (V5/V6)."""
    raw = base.encode()
    if base.major == 4:
        return raw + mac4(raw)
    cipher = _cipher(base.major)
    version = _VERSION.pack(base.minor, base.major)
    return version + iv + cipher.cbc_encrypt(iv, raw + _REQUEST_PAD)


@dataclass(frozen=True, slots=True)
class KmsResponse:
    """A response that passed every check in docs/protocol.md, What a strict client checks."""

    base: BaseResponse
    hwid: bytes = b""  # V6
    salt: bytes = b""  # R (V5/V6)
    iv: bytes = b""  # W (V5/V6)
    warnings: tuple[str, ...] = field(default=())


def decode_response(base_request: BaseRequest, iv: bytes, message: bytes) -> KmsResponse:
    """Client side: decode and verify a response to `base_request` sent with client IV `iv`.

    Raises NotGenuine naming the first check that failed.
    """
    major, minor = base_request.major, base_request.minor
    warnings: list[str] = []
    salt = w = hwid = b""
    if major == 4:
        base, end = BaseResponse.decode(message)
        if message[end : end + BLOCK] != mac4(message[:end]):
            raise NotGenuine("mac", "V4 response MAC does not verify")
        if len(message) != end + BLOCK:
            warnings.append(f"response has {len(message) - end - BLOCK} unexpected trailing bytes")
    else:
        if len(message) < 4 + 2 * BLOCK or (len(message) - 4) % BLOCK:
            raise NotGenuine("size", f"V{major} response of {len(message)} bytes")
        outer_minor, outer_major = _VERSION.unpack_from(message)
        if (outer_major, outer_minor) != (major, minor):
            raise NotGenuine("version", f"response version {outer_major}.{outer_minor}")
        cipher = _cipher(major)
        w = message[4:20]
        body = pkcs7_unpad(cipher.cbc_decrypt(w, message[20:]))
        if body is None:
            raise NotGenuine("decrypt", "response padding is not valid PKCS#7")
        base, end = BaseResponse.decode(body)
        tail = 48 if major == 5 else 88
        if len(body) != end + tail:
            raise NotGenuine("size", f"V{major} body of {len(body)} bytes, {end + tail} expected")
        dc = cipher.decrypt_block(iv)
        x, h = body[end : end + 16], body[end + 16 : end + 48]
        salt = xor16(x, dc)
        if sha256(salt) != h:
            raise NotGenuine("hash", "SHA-256 of the response salt does not match")
        if major == 5:
            if w != iv:
                raise NotGenuine("response_iv", "V5 response IV differs from the request IV")
        else:
            hwid = body[end + 48 : end + 56]
            if body[end + 56 : end + 72] != dc:
                raise NotGenuine("xored_ivs", "XoredIVs field is not the decrypted request IV")
            mac = v6_mac(base.request_time, cipher.decrypt_block(w) + body[: end + 72])
            if body[end + 72 : end + 88] != mac:
                raise NotGenuine("hmac", "V6 response HMAC does not verify")
            if w == iv:
                warnings.append("response IV equals the request IV (an emulator's signature)")
    if (base.major, base.minor) != (major, minor):
        raise NotGenuine("version", f"inner response version {base.major}.{base.minor}")
    if base.client_machine_id != base_request.client_machine_id:
        raise NotGenuine("client_machine_id", f"echoed CMID {guid_text(base.client_machine_id)}")
    if base.request_time != base_request.request_time:
        raise NotGenuine("request_time", f"echoed time {base.request_time}")
    return KmsResponse(base, hwid, salt, w, tuple(warnings))
