"""NDR32 and NDR64 stubs of RequestActivation (docs/protocol.md, The call).

in:  int requestSize, [size_is(requestSize)] byte request[]   (reference pointer, no referent)
out: int *responseSize, [size_is(,*responseSize)] byte **response (unique pointer), int return
"""

from __future__ import annotations

import struct

from .errors import StubError

REFERENT_ID = 0x00020000
_NDR32_IN = struct.Struct("<II")  # requestSize, conformance
_NDR64_IN = struct.Struct("<I4xQ")  # requestSize, pad, conformance
_NDR32_OUT = struct.Struct("<III")  # responseSize, referent, conformance
_NDR64_OUT = struct.Struct("<I4xQQ")
_RETURN = struct.Struct("<I")


def _pad4(n: int) -> bytes:
    return b"\x00" * (-n % 4)


def wrap_request(payload: bytes, ndr64: bool) -> bytes:
    n = len(payload)
    return (_NDR64_IN.pack(n, n) if ndr64 else _NDR32_IN.pack(n, n)) + payload


def unwrap_request(stub: bytes, ndr64: bool) -> bytes:
    head = _NDR64_IN if ndr64 else _NDR32_IN
    if len(stub) < head.size:
        raise StubError(f"stub of {len(stub)} bytes is shorter than its {head.size}-byte header")
    size, conformance = head.unpack_from(stub)
    if size != conformance:
        raise StubError(f"requestSize {size} differs from conformance {conformance}")
    if head.size + size > len(stub):
        raise StubError(f"requestSize {size} exceeds the {len(stub) - head.size} bytes present")
    return stub[head.size : head.size + size]


def wrap_response(payload: bytes, ndr64: bool) -> bytes:
    n = len(payload)
    head = _NDR64_OUT.pack(n, REFERENT_ID, n) if ndr64 else _NDR32_OUT.pack(n, REFERENT_ID, n)
    return head + payload + _pad4(n) + _RETURN.pack(0)


def wrap_error(hresult: int, ndr64: bool) -> bytes:
    """The error form: no data, a NULL referent and the HRESULT."""
    return bytes(16 if ndr64 else 8) + _RETURN.pack(hresult)


def response_length(size: int, ndr64: bool) -> int:
    """Bytes in the response stub that carries `size` bytes (wrap_response's length)."""
    return (_NDR64_OUT if ndr64 else _NDR32_OUT).size + size + (-size % 4) + _RETURN.size


def response_padding(stub: bytes, size: int, ndr64: bool) -> bytes:
    """The pad bytes between a `size`-byte response and the return value in `stub`."""
    start = (_NDR64_OUT if ndr64 else _NDR32_OUT).size + size
    return stub[start : start + (-size % 4)]


def unwrap_response(stub: bytes, ndr64: bool) -> tuple[bytes, int]:
    """Client side: (KMS response, return value); an error form gives (b"", HRESULT)."""
    head = _NDR64_OUT if ndr64 else _NDR32_OUT
    referent_at = 8 if ndr64 else 4
    null_end = referent_at + (8 if ndr64 else 4)
    if len(stub) >= null_end + 4 and not any(stub[referent_at:null_end]):
        return b"", _RETURN.unpack_from(stub, null_end)[0]
    if len(stub) < head.size:
        raise StubError(f"response stub of {len(stub)} bytes is shorter than its header")
    size, _referent, conformance = head.unpack_from(stub)
    if size != conformance:
        raise StubError(f"responseSize {size} differs from conformance {conformance}")
    end = head.size + size
    ret_at = end + (-size % 4)
    if ret_at + 4 > len(stub):
        raise StubError(f"responseSize {size} exceeds the stub")
    return stub[head.size : end], _RETURN.unpack_from(stub, ret_at)[0]
