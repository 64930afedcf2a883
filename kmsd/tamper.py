"""Replies that fail one named check of a strict client (rules' `tamper`), for tests that the
tooling under test notices a host that is not genuine.

Each reply is the genuine one (kms.encode_response) with one field made wrong; everything
the client checks before that field stays right, so the client fails exactly the named
check (the names are NotGenuine.check's, as kmsclient.verify raises them). The RPC-level
checks (rpc_call_id, ndr_referent) are made by the server from the call.
"""

from __future__ import annotations

import dataclasses
import struct

from .protocol.crypto import E5, E6, pkcs7_pad, pkcs7_unpad
from .protocol.kms import BaseResponse, KmsRequest, encode_response

NOT_AN_EPID = "not-an-extended-PID"
_EPID_SIZE_AT = 4  # the base response's ePID size field: after minor and major (§4.3)


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def tampered_response(
    request: KmsRequest,
    base: BaseResponse,
    check: str,
    *,
    salt: bytes,
    response_iv: bytes,
    hwid: bytes,
) -> bytes:
    """The KMS response to `request` that fails `check` (a key of rules.TAMPER_CHECKS that
    applies to the request's version)."""
    fields = {
        "client_machine_id": {"client_machine_id": _flip(base.client_machine_id, 15)},
        "request_time": {"request_time": base.request_time ^ 1},
        "version": {"minor": base.minor ^ 1},
        "epid_format": {"epid": NOT_AN_EPID},
    }
    if check in fields:  # a genuine reply of wrong content: every MAC verifies
        base = dataclasses.replace(base, **fields[check])  # type: ignore[arg-type]
    good = encode_response(request, base, salt=salt, response_iv=response_iv, hwid=hwid)
    if check in fields:
        return good
    end = len(base.encode())  # the base response's length; the V5/V6 extras follow it
    if request.major == 4:
        if check == "mac":
            return _flip(good, len(good) - 1)
        if check == "size":
            return good[:_EPID_SIZE_AT]
        if check == "epid":
            return good[:_EPID_SIZE_AT] + struct.pack("<I", 3) + good[_EPID_SIZE_AT + 4 :]
        raise ValueError(f"no {check!r} check in a V4 reply")
    cipher = E6 if request.major >= 6 else E5
    head, w = good[:4], good[4:20]
    body = pkcs7_unpad(cipher.cbc_decrypt(w, good[20:]))
    assert body is not None  # we just encrypted it
    padded = None
    if check == "decrypt":
        padded = pkcs7_pad(body)[:-1] + b"\x00"
    elif check == "size":
        body += bytes(16)
    elif check == "epid":
        body = body[:_EPID_SIZE_AT] + struct.pack("<I", 3) + body[_EPID_SIZE_AT + 4 :]
    elif check == "hash":
        body = _flip(body, end + 16)
    elif check == "xored_ivs" and request.major >= 6:
        body = _flip(body, end + 56)
    elif check == "hmac" and request.major >= 6:
        body = _flip(body, end + 72)
    elif check == "response_iv" and request.major == 5:
        w = _flip(w, 0)
    else:
        raise ValueError(f"no {check!r} check in a V{request.major} reply")
    return head + w + cipher.cbc_encrypt(w, padded or pkcs7_pad(body))
