"""Block ciphers and MACs of the KMS protocol (docs/protocol.md, KMS messages).

V4's 160-bit-key Rijndael and V6's AES with three altered round-key bytes cannot be
expressed with a standard library, so they are written here once, as a table-driven
Rijndael that serves both: `PyRijndael` in pure Python, and `CRijndael`, its compiled twin
from the optional C extension `kmsd.protocol._rijndael` (built by `pip install` when a C
compiler is available). Both take the key schedule from `expand_key`, so the schedule and
the V6 tweak are defined once. `Rijndael` is `CRijndael` when the extension imports and
the environment variable KMSD_PURE_PYTHON is not set to a non-empty value other than 0,
else `PyRijndael`.

V5 is plain AES-128: `CRijndael` with the V5 key when compiled (the same speed as
`cryptography` for a KMS message, and the daemon then never loads `cryptography` and its
own OpenSSL, about 7 MiB of memory), else `Aes`, through `cryptography`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

K4 = bytes.fromhex("053d8307f9e5f088eb5ea6686cf037c7e4efd2d6")
K5 = bytes.fromhex("cd7e796f2ab25dcb55ffc8ef8364c470")
K6 = bytes.fromhex("a94a4195e201432d9bcb460405d84a21")

# V6 HMAC key derivation constants (docs/protocol.md, V5 and V6 responses).
C1 = 0x00000022816889BD
C2 = 0x000000208CBAB5ED
C3 = 0x3156CD5AC628477A

BLOCK = 16


def _gf_mul(a: int, b: int) -> int:
    product = 0
    while b:
        if b & 1:
            product ^= a
        a = ((a << 1) ^ 0x11B) if a & 0x80 else (a << 1)
        b >>= 1
    return product


def _make_sbox() -> tuple[list[int], list[int]]:
    # Multiplicative inverses from the powers of the generator 3: if x = 3^k, its inverse is
    # 3^(255-k). One pass over 255 powers, not a search over 255 x 255 products.
    power, powers = 1, []
    for _ in range(255):
        powers.append(power)
        power = _gf_mul(power, 3)
    inverse = [0] * 256
    for k, x in enumerate(powers):
        inverse[x] = powers[-k]  # k = 0: x = 1, its own inverse (powers[0])
    sbox = [0] * 256
    for x in range(256):
        b = inverse[x]
        s = b
        for shift in range(1, 5):
            s ^= ((b << shift) | (b >> (8 - shift))) & 0xFF
        sbox[x] = s ^ 0x63
    inv_sbox = [0] * 256
    for x, s in enumerate(sbox):
        inv_sbox[s] = x
    return sbox, inv_sbox


SBOX, INV_SBOX = _make_sbox()


def _ror8(w: int) -> int:
    return ((w >> 8) | (w << 24)) & 0xFFFFFFFF


def _tables(
    box: list[int], coeffs: tuple[int, int, int, int]
) -> tuple[list[int], list[int], list[int], list[int]]:
    t0 = []
    for x in range(256):
        s = box[x]
        c0, c1, c2, c3 = (_gf_mul(s, c) for c in coeffs)
        t0.append((c0 << 24) | (c1 << 16) | (c2 << 8) | c3)
    t1 = [_ror8(w) for w in t0]
    t2 = [_ror8(w) for w in t1]
    t3 = [_ror8(w) for w in t2]
    return t0, t1, t2, t3


TE = _tables(SBOX, (2, 1, 1, 3))
TD = _tables(INV_SBOX, (14, 9, 13, 11))
_RCON = [0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x1B, 0x36]

# Round-key word index -> XOR mask: byte 0 of round keys 4, 6 and 8 (docs/protocol.md,
# V5 and V6 requests).
V6_TWEAK = {16: 0x73 << 24, 24: 0x09 << 24, 32: 0xE4 << 24}


def _sub_word(w: int) -> int:
    return (
        (SBOX[w >> 24] << 24)
        | (SBOX[(w >> 16) & 0xFF] << 16)
        | (SBOX[(w >> 8) & 0xFF] << 8)
        | SBOX[w & 0xFF]
    )


def expand_key(key: bytes, tweak: dict[int, int] | None = None) -> list[int]:
    """Rijndael key expansion for a 128-bit block (Nk = len(key)/4, Nr = Nk + 6)."""
    nk = len(key) // 4
    if len(key) % 4 or not 4 <= nk <= 8:
        raise ValueError("Rijndael key must be 16 to 32 bytes in 4-byte steps")
    words = list(struct.unpack(f">{nk}I", key))
    for i in range(nk, 4 * (nk + 7)):
        t = words[i - 1]
        if i % nk == 0:
            t = _sub_word(((t << 8) | (t >> 24)) & 0xFFFFFFFF) ^ (_RCON[i // nk - 1] << 24)
        elif nk > 6 and i % nk == 4:
            t = _sub_word(t)
        words.append(words[i - nk] ^ t)
    for index, mask in (tweak or {}).items():
        words[index] ^= mask
    return words


class BlockCipher(Protocol):
    def encrypt_block(self, block: bytes) -> bytes: ...
    def decrypt_block(self, block: bytes) -> bytes: ...
    def cbc_encrypt(self, iv: bytes, data: bytes) -> bytes: ...
    def cbc_decrypt(self, iv: bytes, data: bytes) -> bytes: ...


def _schedule_bytes(key: bytes, tweak: dict[int, int] | None) -> bytes:
    words = expand_key(key, tweak)
    return struct.pack(f">{len(words)}I", *words)


class PyRijndael:
    """Rijndael with a 128-bit block, any standard key size, optionally altered round keys."""

    def __init__(self, key: bytes, tweak: dict[int, int] | None = None) -> None:
        ek = expand_key(key, tweak)
        self.rounds = len(ek) // 4 - 1
        self._ek = ek
        # Equivalent inverse cipher: reversed round keys, InvMixColumns on the inner ones.
        dk: list[int] = []
        for r in range(self.rounds, -1, -1):
            rk = ek[4 * r : 4 * r + 4]
            if 0 < r < self.rounds:
                rk = [self._inv_mix(w) for w in rk]
            dk.extend(rk)
        self._dk = dk

    @staticmethod
    def _inv_mix(w: int) -> int:
        d0, d1, d2, d3 = TD
        return (
            d0[SBOX[w >> 24]]
            ^ d1[SBOX[(w >> 16) & 0xFF]]
            ^ d2[SBOX[(w >> 8) & 0xFF]]
            ^ d3[SBOX[w & 0xFF]]
        )

    def _encrypt(self, s0: int, s1: int, s2: int, s3: int) -> tuple[int, int, int, int]:
        t0_, t1_, t2_, t3_ = TE
        rk = self._ek
        s0 ^= rk[0]
        s1 ^= rk[1]
        s2 ^= rk[2]
        s3 ^= rk[3]
        k = 4
        for _ in range(self.rounds - 1):
            s0, s1, s2, s3 = (
                t0_[s0 >> 24]
                ^ t1_[(s1 >> 16) & 255]
                ^ t2_[(s2 >> 8) & 255]
                ^ t3_[s3 & 255]
                ^ rk[k],
                t0_[s1 >> 24]
                ^ t1_[(s2 >> 16) & 255]
                ^ t2_[(s3 >> 8) & 255]
                ^ t3_[s0 & 255]
                ^ rk[k + 1],
                t0_[s2 >> 24]
                ^ t1_[(s3 >> 16) & 255]
                ^ t2_[(s0 >> 8) & 255]
                ^ t3_[s1 & 255]
                ^ rk[k + 2],
                t0_[s3 >> 24]
                ^ t1_[(s0 >> 16) & 255]
                ^ t2_[(s1 >> 8) & 255]
                ^ t3_[s2 & 255]
                ^ rk[k + 3],
            )
            k += 4
        sb = SBOX
        return (
            (
                (sb[s0 >> 24] << 24)
                | (sb[(s1 >> 16) & 255] << 16)
                | (sb[(s2 >> 8) & 255] << 8)
                | sb[s3 & 255]
            )
            ^ rk[k],
            (
                (sb[s1 >> 24] << 24)
                | (sb[(s2 >> 16) & 255] << 16)
                | (sb[(s3 >> 8) & 255] << 8)
                | sb[s0 & 255]
            )
            ^ rk[k + 1],
            (
                (sb[s2 >> 24] << 24)
                | (sb[(s3 >> 16) & 255] << 16)
                | (sb[(s0 >> 8) & 255] << 8)
                | sb[s1 & 255]
            )
            ^ rk[k + 2],
            (
                (sb[s3 >> 24] << 24)
                | (sb[(s0 >> 16) & 255] << 16)
                | (sb[(s1 >> 8) & 255] << 8)
                | sb[s2 & 255]
            )
            ^ rk[k + 3],
        )

    def _decrypt(self, s0: int, s1: int, s2: int, s3: int) -> tuple[int, int, int, int]:
        t0_, t1_, t2_, t3_ = TD
        rk = self._dk
        s0 ^= rk[0]
        s1 ^= rk[1]
        s2 ^= rk[2]
        s3 ^= rk[3]
        k = 4
        for _ in range(self.rounds - 1):
            s0, s1, s2, s3 = (
                t0_[s0 >> 24]
                ^ t1_[(s3 >> 16) & 255]
                ^ t2_[(s2 >> 8) & 255]
                ^ t3_[s1 & 255]
                ^ rk[k],
                t0_[s1 >> 24]
                ^ t1_[(s0 >> 16) & 255]
                ^ t2_[(s3 >> 8) & 255]
                ^ t3_[s2 & 255]
                ^ rk[k + 1],
                t0_[s2 >> 24]
                ^ t1_[(s1 >> 16) & 255]
                ^ t2_[(s0 >> 8) & 255]
                ^ t3_[s3 & 255]
                ^ rk[k + 2],
                t0_[s3 >> 24]
                ^ t1_[(s2 >> 16) & 255]
                ^ t2_[(s1 >> 8) & 255]
                ^ t3_[s0 & 255]
                ^ rk[k + 3],
            )
            k += 4
        ib = INV_SBOX
        return (
            (
                (ib[s0 >> 24] << 24)
                | (ib[(s3 >> 16) & 255] << 16)
                | (ib[(s2 >> 8) & 255] << 8)
                | ib[s1 & 255]
            )
            ^ rk[k],
            (
                (ib[s1 >> 24] << 24)
                | (ib[(s0 >> 16) & 255] << 16)
                | (ib[(s3 >> 8) & 255] << 8)
                | ib[s2 & 255]
            )
            ^ rk[k + 1],
            (
                (ib[s2 >> 24] << 24)
                | (ib[(s1 >> 16) & 255] << 16)
                | (ib[(s0 >> 8) & 255] << 8)
                | ib[s3 & 255]
            )
            ^ rk[k + 2],
            (
                (ib[s3 >> 24] << 24)
                | (ib[(s2 >> 16) & 255] << 16)
                | (ib[(s1 >> 8) & 255] << 8)
                | ib[s0 & 255]
            )
            ^ rk[k + 3],
        )

    def encrypt_block(self, block: bytes) -> bytes:
        _check_block(block, "block")
        return struct.pack(">4I", *self._encrypt(*struct.unpack(">4I", block)))

    def decrypt_block(self, block: bytes) -> bytes:
        _check_block(block, "block")
        return struct.pack(">4I", *self._decrypt(*struct.unpack(">4I", block)))

    def cbc_encrypt(self, iv: bytes, data: bytes) -> bytes:
        _check_block(iv, "iv")
        _check_blocks(data)
        words = struct.unpack(f">{len(data) // 4}I", data)
        c0, c1, c2, c3 = struct.unpack(">4I", iv)
        out: list[int] = []
        encrypt = self._encrypt
        for i in range(0, len(words), 4):
            c0, c1, c2, c3 = encrypt(
                c0 ^ words[i], c1 ^ words[i + 1], c2 ^ words[i + 2], c3 ^ words[i + 3]
            )
            out += (c0, c1, c2, c3)
        return struct.pack(f">{len(out)}I", *out)

    def cbc_decrypt(self, iv: bytes, data: bytes) -> bytes:
        _check_block(iv, "iv")
        _check_blocks(data)
        words = struct.unpack(f">{len(data) // 4}I", data)
        p0, p1, p2, p3 = struct.unpack(">4I", iv)
        out: list[int] = []
        decrypt = self._decrypt
        for i in range(0, len(words), 4):
            d0, d1, d2, d3 = decrypt(words[i], words[i + 1], words[i + 2], words[i + 3])
            out += (d0 ^ p0, d1 ^ p1, d2 ^ p2, d3 ^ p3)
            p0, p1, p2, p3 = words[i : i + 4]
        return struct.pack(f">{len(out)}I", *out)

    def cbc_mac(self, data: bytes) -> bytes:
        """CBC-MAC with a zero IV over data already padded to whole blocks."""
        _check_blocks(data)
        words = struct.unpack(f">{len(data) // 4}I", data)
        s0 = s1 = s2 = s3 = 0
        encrypt = self._encrypt
        for i in range(0, len(words), 4):
            s0, s1, s2, s3 = encrypt(
                s0 ^ words[i], s1 ^ words[i + 1], s2 ^ words[i + 2], s3 ^ words[i + 3]
            )
        return struct.pack(">4I", s0, s1, s2, s3)


try:
    from . import _rijndael
except ImportError:  # built without a C compiler: pure Python only
    _rijndael = None  # type: ignore[assignment]

if _rijndael is not None:

    class CRijndael(_rijndael.Rijndael):
        """The compiled twin of PyRijndael (kmsd/protocol/_rijndael.c), same interface."""

        __slots__ = ()

        def __init__(self, key: bytes, tweak: dict[int, int] | None = None) -> None:
            super().__init__(_schedule_bytes(key, tweak))

    ACCELERATED_AVAILABLE = True
else:
    ACCELERATED_AVAILABLE = False

ACCELERATED = ACCELERATED_AVAILABLE and os.environ.get("KMSD_PURE_PYTHON", "") in ("", "0")
"""True when `Rijndael` (and so E4, E6) is the compiled implementation."""

if TYPE_CHECKING:
    Rijndael = PyRijndael
elif ACCELERATED:
    Rijndael = CRijndael
else:
    Rijndael = PyRijndael


class Aes:
    """Standard AES through `cryptography`, with the same interface as Rijndael.

    Building a `Cipher` and a context costs microseconds, more than the AES itself, so
    the contexts live as long as the object:
    * ECB is stateless, so one encryptor and one decryptor serve every block call;
    * CBC decryption of whole blocks is ECB decryption XOR (IV ‖ C[:-16]), in one call;
    * CBC encryption keeps one running CBC encryptor; its chaining value is the last
      ciphertext block it produced (`_chain`). To start a message with another IV, the
      first plaintext block is XORed with IV ⊕ _chain, so the context's own XOR with
      _chain leaves exactly P0 ⊕ IV. The lock keeps `_chain` and the context in step.
    """

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        algorithm = algorithms.AES(key)
        ecb = Cipher(algorithm, modes.ECB())
        self._ecb_encrypt = ecb.encryptor().update
        self._ecb_decrypt = ecb.decryptor().update
        self._cbc_encrypt = Cipher(algorithm, modes.CBC(bytes(BLOCK))).encryptor().update
        self._chain = 0
        self._lock = threading.Lock()

    def encrypt_block(self, block: bytes) -> bytes:
        _check_block(block, "block")
        return self._ecb_encrypt(block)

    def decrypt_block(self, block: bytes) -> bytes:
        _check_block(block, "block")
        return self._ecb_decrypt(block)

    def cbc_encrypt(self, iv: bytes, data: bytes) -> bytes:
        _check_block(iv, "iv")
        _check_blocks(data)
        if not data:
            return b""
        with self._lock:
            first = int.from_bytes(data[:BLOCK], "big") ^ int.from_bytes(iv, "big") ^ self._chain
            out = self._cbc_encrypt(first.to_bytes(BLOCK, "big") + data[BLOCK:])
            self._chain = int.from_bytes(out[-BLOCK:], "big")
        return out

    def cbc_decrypt(self, iv: bytes, data: bytes) -> bytes:
        _check_block(iv, "iv")
        _check_blocks(data)
        if not data:
            return b""
        n = len(data)
        plain = int.from_bytes(self._ecb_decrypt(data), "big")
        return (plain ^ int.from_bytes(iv + data[:-BLOCK], "big")).to_bytes(n, "big")


def _check_block(block: bytes, what: str) -> None:
    if len(block) != BLOCK:
        raise ValueError(f"{what} must be {BLOCK} bytes, got {len(block)}")


def _check_blocks(data: bytes) -> None:
    if len(data) % BLOCK:
        raise ValueError(f"data length {len(data)} is not a multiple of {BLOCK}")


E4 = Rijndael(K4)
E5: BlockCipher = Rijndael(K5) if ACCELERATED else Aes(K5)
E6: BlockCipher = Rijndael(K6, V6_TWEAK)


def mac4(message: bytes) -> bytes:
    """V4 MAC: CBC-MAC under E4 with "10*" padding and no subkeys (docs/protocol.md, V4)."""
    padded = message + b"\x80" + b"\x00" * (-(len(message) + 1) % BLOCK)
    return E4.cbc_mac(padded)


_PADS = [bytes([BLOCK - r]) * (BLOCK - r) for r in range(BLOCK)]  # by len(data) % BLOCK


def pkcs7_pad(data: bytes) -> bytes:
    return data + _PADS[len(data) % BLOCK]


def pkcs7_unpad(data: bytes) -> bytes | None:
    """The data without its PKCS#7 padding, or None when the padding is not valid."""
    if not data or len(data) % BLOCK:
        return None
    n = data[-1]
    if not 1 <= n <= BLOCK or data[-n:] != bytes([n]) * n:
        return None
    return data[:-n]


def _slot(request_time: int) -> int:
    # The slot changes every ~4.1 h of client time, so nearly every request hits the caches.
    return ((request_time // C1) * C2 + C3) & 0xFFFFFFFFFFFFFFFF


def v6_hmac_key(request_time: int) -> bytes:
    return _slot_key(_slot(request_time))


@functools.lru_cache(maxsize=16)
def _slot_key(slot: int) -> bytes:
    return hashlib.sha256(slot.to_bytes(8, "little")).digest()[16:]


@functools.lru_cache(maxsize=16)
def _keyed_sha256(slot: int) -> tuple[Any, Any]:
    """HMAC-SHA256 (RFC 2104) under the slot's key, keyed once: the SHA-256 states after
    the inner and the outer padded key, copied for each message. hmac.digest would
    look the digest up and absorb both pads again for every request."""
    block = _slot_key(slot).ljust(_SHA256_BLOCK, b"\x00")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))
    return inner, outer


_SHA256_BLOCK = 64


def v6_mac(request_time: int, data: bytes) -> bytes:
    """The V6 HMAC: the last 16 bytes of HMAC-SHA256(v6_hmac_key(request_time), data)."""
    inner, outer = _keyed_sha256(_slot(request_time))
    inner = inner.copy()
    inner.update(data)
    outer = outer.copy()
    outer.update(inner.digest())
    mac: bytes = outer.digest()[16:]
    return mac


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def xor16(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(BLOCK, "big")


RandomSource = Callable[[int], bytes]


class RandomPool:
    """A RandomSource: os.urandom read `block` bytes at a time and handed out in slices,
    so that a reply's salt and IV cost no system call of their own (one getrandom() per
    128 V6 replies). Every byte is handed out once. Not for a process that forks after
    drawing from it (parent and child would share the rest of the block)."""

    def __init__(self, block: int = 4096) -> None:
        self.block = block
        self._pool = b""
        self._at = 0

    def __call__(self, n: int) -> bytes:
        end = self._at + n
        if end > len(self._pool):
            self._pool, self._at, end = os.urandom(max(self.block, n)), 0, n
        out = self._pool[self._at : end]
        self._at = end
        return out
