#!/usr/bin/env python3
"""CPU cost of the KMS ciphers: pure-Python Rijndael against the compiled accelerator.

Prints, for each implementation of V4/V6's Rijndael (`PyRijndael`, `CRijndael`):

  block          one E6 block encryption (encrypt_block)
  V4 MAC         mac4 of a 236-byte base request (15 blocks, CBC-MAC under E4)
  V6 CBC-240     E6 CBC encryption of 240 bytes (a whole V6 request or response)
  V4/V6 act.     the server's crypto for one activation: V4 = MAC of the request and of
                 a 144-byte response; V6 = CBC-decrypt 240, Dc = D6(IVc), P0 = D6(W),
                 SHA-256, HMAC-SHA256, CBC-encrypt 240 (docs/protocol.md, "KMS messages")

and the speedup. V5 (AES through `cryptography`) is shown for the current `Aes`, which
keeps its cipher contexts, and for a per-call one that builds a `Cipher` on every call
(what `Aes` did before). Then the whole codec per activation (kms.decode_request and
kms.encode_response) with the implementation that `kmsd` selects, and the same in a
subprocess with KMSD_PURE_PYTHON=1.

Figures are the best of `--repeat` timings of loops of about `--seconds` each. This is a
benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import timeit
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from kmsd.protocol import crypto, kms
from kmsd.protocol.crypto import (
    K4,
    K5,
    K6,
    V6_TWEAK,
    Aes,
    PyRijndael,
    pkcs7_pad,
    sha256,
    v6_mac,
    xor16,
)

IV = bytes(range(16))
W = bytes(range(16, 32))
SALT = bytes(range(32, 48))
DATA_240 = bytes(range(240))
REQUEST_236 = bytes(236)
RESPONSE_144 = bytes(144)
REQUEST_TIME = 134403835700000000


class PerCallAes:
    """AES the way crypto.Aes did it before: a new Cipher context on every call."""

    def __init__(self, key: bytes) -> None:
        self._algorithm = algorithms.AES(key)
        self._ecb = Cipher(self._algorithm, modes.ECB())

    def encrypt_block(self, block: bytes) -> bytes:
        enc = self._ecb.encryptor()
        return enc.update(block) + enc.finalize()

    def decrypt_block(self, block: bytes) -> bytes:
        dec = self._ecb.decryptor()
        return dec.update(block) + dec.finalize()

    def cbc_encrypt(self, iv: bytes, data: bytes) -> bytes:
        enc = Cipher(self._algorithm, modes.CBC(iv)).encryptor()
        return enc.update(data) + enc.finalize()

    def cbc_decrypt(self, iv: bytes, data: bytes) -> bytes:
        dec = Cipher(self._algorithm, modes.CBC(iv)).decryptor()
        return dec.update(data) + dec.finalize()


def pad10(message: bytes) -> bytes:
    return message + b"\x80" + b"\x00" * (-(len(message) + 1) % 16)


def time_us(func: Callable[[], object], seconds: float, repeat: int) -> float:
    """Best-of-`repeat` time of one call of `func`, in µs."""
    timer = timeit.Timer(func)
    once = min(timer.repeat(repeat=3, number=1))
    number = max(1, int(seconds / max(once, 1e-7)))
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def rijndael_figures(cls: Any, seconds: float, repeat: int) -> dict[str, float]:
    e4, e6 = cls(K4), cls(K6, V6_TWEAK)
    request_mac, response_mac = pad10(REQUEST_236), pad10(RESPONSE_144)

    def v4_activation() -> None:
        e4.cbc_mac(request_mac)
        e4.cbc_mac(response_mac)

    def v6_activation() -> None:
        e6.cbc_decrypt(IV, DATA_240)
        dc = e6.decrypt_block(IV)
        p0 = e6.decrypt_block(W)
        extra = xor16(SALT, dc) + sha256(SALT)
        signed = DATA_240[:132] + extra + bytes(8) + dc
        signed += v6_mac(REQUEST_TIME, p0 + signed)
        e6.cbc_encrypt(W, pkcs7_pad(signed))

    return {
        "block": time_us(lambda: e6.encrypt_block(IV), seconds, repeat),
        "v4_mac": time_us(lambda: e4.cbc_mac(request_mac), seconds, repeat),
        "v6_cbc_240": time_us(lambda: e6.cbc_encrypt(IV, DATA_240), seconds, repeat),
        "v4_activation": time_us(v4_activation, seconds, repeat),
        "v6_activation": time_us(v6_activation, seconds, repeat),
    }


def aes_figures(cls: Any, seconds: float, repeat: int) -> dict[str, float]:
    e5 = cls(K5)

    def v5_activation() -> None:
        e5.cbc_decrypt(IV, DATA_240)
        dc = e5.decrypt_block(IV)
        extra = xor16(SALT, dc) + sha256(SALT)
        e5.cbc_encrypt(IV, pkcs7_pad(DATA_240[:144] + extra))

    return {
        "block": time_us(lambda: e5.encrypt_block(IV), seconds, repeat),
        "v5_cbc_240": time_us(lambda: e5.cbc_encrypt(IV, DATA_240), seconds, repeat),
        "v5_activation": time_us(v5_activation, seconds, repeat),
    }


def codec_figures(seconds: float, repeat: int) -> dict[str, Any]:
    """decode_request + encode_response per version, with the selected implementation."""
    figures: dict[str, Any] = {"implementation": crypto.Rijndael.__name__}
    for major in (4, 5, 6):
        base = kms.BaseRequest(
            major=major,
            minor=0,
            is_vm=0,
            license_status=2,
            binding_expiration=43200,
            application_id=uuid.UUID(int=1).bytes_le,
            sku_id=uuid.UUID(int=2).bytes_le,
            kms_id=uuid.UUID(int=3).bytes_le,
            client_machine_id=uuid.UUID(int=4).bytes_le,
            required_count=25,
            request_time=REQUEST_TIME,
            previous_client_machine_id=uuid.UUID(int=0).bytes_le,
            workstation="bench.example",
        )
        message = kms.encode_request(base, iv=IV)
        request = kms.decode_request(message)
        response = kms.BaseResponse(
            major=major,
            minor=0,
            epid="06401-00206-271-111111-03-1033-17763.0000-0052019",
            client_machine_id=base.client_machine_id,
            request_time=REQUEST_TIME,
            count=50,
            activation_interval=120,
            renewal_interval=10080,
        )

        def activation(message: bytes = message, response: Any = response) -> None:
            request = kms.decode_request(message)
            kms.encode_response(request, response, salt=SALT, response_iv=W)

        kms.encode_response(request, response, salt=SALT, response_iv=W)
        figures[f"v{major}"] = time_us(activation, seconds, repeat)
    return figures


def pure_codec_figures(seconds: float, repeat: int) -> dict[str, Any] | None:
    result = subprocess.run(
        [
            sys.executable,
            __file__,
            "--codec-only",
            "--seconds",
            str(seconds),
            "--repeat",
            str(repeat),
        ],
        env={**os.environ, "KMSD_PURE_PYTHON": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        print(result.stderr, file=sys.stderr)
        return None
    figures: dict[str, Any] = json.loads(result.stdout)
    return figures


def ratio(slow: float | None, fast: float | None) -> str:
    return f"{slow / fast:8.1f}x" if slow and fast else f"{'-':>9}"


def cell(value: float | None) -> str:
    return f"{value:10.2f}" if value is not None else f"{'n/a':>10}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=0.2, help="length of one timing loop")
    p.add_argument("--repeat", type=int, default=5, help="timing loops per figure (best)")
    p.add_argument("--quick", action="store_true", help="short loops (a smoke run)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--codec-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    seconds, repeat = (0.01, 2) if args.quick else (args.seconds, args.repeat)

    if args.codec_only:
        print(json.dumps(codec_figures(seconds, repeat)))
        return 0

    report: dict[str, Any] = {
        "accelerated_available": crypto.ACCELERATED_AVAILABLE,
        "selected": crypto.Rijndael.__name__,
        "rijndael": {"pure": rijndael_figures(PyRijndael, seconds, repeat)},
        "aes": {
            "per_call": aes_figures(PerCallAes, seconds, repeat),
            "kept_contexts": aes_figures(Aes, seconds, repeat),
        },
        "codec": {"selected": codec_figures(seconds, repeat)},
    }
    if crypto.ACCELERATED_AVAILABLE:
        report["rijndael"]["accelerated"] = rijndael_figures(crypto.CRijndael, seconds, repeat)
    if crypto.ACCELERATED:
        report["codec"]["pure"] = pure_codec_figures(seconds, repeat)

    if args.json:
        print(json.dumps(report, indent=2))
        return 0

    pure = report["rijndael"]["pure"]
    fast = report["rijndael"].get("accelerated", {})
    print(f"Rijndael (V4, V6), µs per call; accelerated: {crypto.ACCELERATED_AVAILABLE}")
    print(f"{'':16}{'pure':>10}{'compiled':>10}{'speedup':>9}")
    labels = {
        "block": "block",
        "v4_mac": "V4 MAC (236 B)",
        "v6_cbc_240": "V6 CBC-240",
        "v4_activation": "V4 activation",
        "v6_activation": "V6 activation",
    }
    for key, label in labels.items():
        print(f"{label:16}{cell(pure[key])}{cell(fast.get(key))}{ratio(pure[key], fast.get(key))}")

    slow, kept = report["aes"]["per_call"], report["aes"]["kept_contexts"]
    print("\nAES (V5, cryptography), µs per call")
    print(f"{'':16}{'per-call':>10}{'kept':>10}{'speedup':>9}")
    for key, label in {
        "block": "block",
        "v5_cbc_240": "V5 CBC-240",
        "v5_activation": "V5 activation",
    }.items():
        print(f"{label:16}{cell(slow[key])}{cell(kept[key])}{ratio(slow[key], kept[key])}")

    selected = report["codec"]["selected"]
    other = report["codec"].get("pure") or {}
    print("\nCodec per activation (decode_request + encode_response), µs")
    print(f"{'':16}{'pure':>10}{selected['implementation']:>10}{'speedup':>9}")
    for major in (4, 5, 6):
        key = f"v{major}"
        print(
            f"{'V' + str(major):16}{cell(other.get(key))}{cell(selected[key])}"
            f"{ratio(other.get(key), selected[key])}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
