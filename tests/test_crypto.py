"""Known-answer tests of PROTOCOL.md Appendix A, and the ciphers' own consistency."""

from __future__ import annotations

import os

import pytest

from kmsd.protocol.crypto import (
    E4,
    E5,
    E6,
    K6,
    V6_TWEAK,
    Aes,
    Rijndael,
    expand_key,
    mac4,
    pkcs7_pad,
    pkcs7_unpad,
    v6_hmac_key,
)

ZERO = bytes(16)
COUNTING = bytes(range(16))


@pytest.mark.parametrize(
    ("cipher", "block", "expected"),
    [
        (E4, ZERO, "933030f10e2e7782b80915d5778a4957"),
        (E5, ZERO, "ec7c7e75b1923978eac4b2d2260235d5"),
        (E6, ZERO, "8ca59de0c483c04aa7026a22d6dd208e"),
        (Rijndael(K6), ZERO, "b4c3c015f6fb320c9b64aecd52fa58c8"),
        (E6, COUNTING, "ca89ca11b2c4e77a94e806af17136b38"),
    ],
    ids=["E4", "E5", "E6", "AES-K6-untweaked", "E6-counting"],
)
def test_block_known_answers(cipher: Rijndael | Aes, block: bytes, expected: str) -> None:
    assert cipher.encrypt_block(block).hex() == expected
    assert cipher.decrypt_block(bytes.fromhex(expected)) == block


def test_v6_round_key_tweak() -> None:
    plain = expand_key(K6)
    tweaked = expand_key(K6, V6_TWEAK)
    as_hex = lambda words, r: b"".join(w.to_bytes(4, "big") for w in words[4 * r : 4 * r + 4]).hex()  # noqa: E731
    assert as_hex(plain, 4) == "7630e12e111e2b4d3f6a5901edca6094"
    assert as_hex(tweaked, 4).startswith("0530e12e")
    assert as_hex(plain, 6) == "6adec9456920217355b4904484ea41e7"
    assert as_hex(tweaked, 6).startswith("63dec945")
    assert as_hex(plain, 8) == "0bc82943cfb5552a5e7cb9074b5f14cd"
    assert as_hex(tweaked, 8).startswith("efc82943")
    # Only those three bytes differ: the tweak does not propagate.
    assert sum(a != b for a, b in zip(plain, tweaked, strict=True)) == 3


def test_v4_key_schedule_last_round_key() -> None:
    words = expand_key(bytes.fromhex("053d8307f9e5f088eb5ea6686cf037c7e4efd2d6"))
    assert len(words) == 48
    assert b"".join(w.to_bytes(4, "big") for w in words[44:]).hex() == (
        "4a7d08d621ed8fd1454df13ba968579d"
    )


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (b"", "d144963029e2bd12f9970c9f52b27f09"),
        (COUNTING, "bc8d323f3fd2fbed498edb35a1042378"),
        (bytes(236), "4c1b4de4008508d66d9ed22963ae52b2"),
    ],
    ids=["empty", "one-block", "236-zero"],
)
def test_mac4_known_answers(message: bytes, expected: str) -> None:
    assert mac4(message).hex() == expected


def test_v6_hmac_key_known_answer() -> None:
    assert v6_hmac_key(134403835700000000).hex() == "f53800b1341209c87ab605fcb19a4349"


@pytest.mark.parametrize("cipher", [E4, E5, E6], ids=["E4", "E5", "E6"])
def test_cbc_round_trip_and_chaining(cipher: Rijndael | Aes) -> None:
    iv, data = os.urandom(16), os.urandom(240)
    sealed = cipher.cbc_encrypt(iv, data)
    assert cipher.cbc_decrypt(iv, sealed) == data
    # CBC: block i is E(P_i xor C_{i-1}).
    assert sealed[16:32] == cipher.encrypt_block(
        bytes(a ^ b for a, b in zip(data[16:32], sealed[:16], strict=True))
    )


def test_pure_rijndael_equals_aes_for_a_standard_key() -> None:
    key = os.urandom(16)
    iv, data = os.urandom(16), os.urandom(64)
    assert Rijndael(key).cbc_encrypt(iv, data) == Aes(key).cbc_encrypt(iv, data)


def test_pkcs7() -> None:
    for n in range(33):
        data = os.urandom(n)
        padded = pkcs7_pad(data)
        assert len(padded) % 16 == 0 and len(padded) > n
        assert pkcs7_unpad(padded) == data
    assert pkcs7_unpad(bytes(16)) is None
    assert pkcs7_unpad(b"\x01" * 15 + b"\x02") is None
    assert pkcs7_unpad(b"\x11" * 16) is None


def test_cbc_rejects_partial_blocks() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        E6.cbc_encrypt(ZERO, bytes(15))
