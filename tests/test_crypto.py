"""Known-answer tests of the ciphers and MACs (docs/protocol.md, "KMS messages"), and the
ciphers' own consistency.

Every Rijndael test runs on both implementations: the pure-Python `PyRijndael` and the
compiled `CRijndael` (kmsd/protocol/_rijndael.c). The compiled one is skipped when the
extension was not built, except in CI (CI=true), where a missing extension is a failure.
"""

from __future__ import annotations

import hmac
import json
import os
import random
import site
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsd.protocol import crypto
from kmsd.protocol.crypto import (
    E4,
    E5,
    E6,
    K4,
    K5,
    K6,
    V6_TWEAK,
    Aes,
    BlockCipher,
    PyRijndael,
    expand_key,
    mac4,
    pkcs7_pad,
    pkcs7_unpad,
    v6_hmac_key,
)
from tests.conftest import read_until

ROOT = Path(__file__).resolve().parent.parent
ZERO = bytes(16)
COUNTING = bytes(range(16))
IN_CI = os.environ.get("CI", "").lower() == "true"


def require_extension() -> None:
    """Skip without the C extension, or fail in CI, which must build it."""
    if not crypto.ACCELERATED_AVAILABLE:
        message = "the C extension kmsd.protocol._rijndael is not built"
        if IN_CI:
            pytest.fail(f"{message} (required when CI=true)")
        pytest.skip(message)


@pytest.fixture(params=["pure", "accelerated"])
def impl(request: pytest.FixtureRequest) -> Any:
    """The Rijndael class under test, called like Rijndael(key, tweak)."""
    if request.param == "pure":
        return PyRijndael
    require_extension()
    return crypto.CRijndael


def pad10(message: bytes) -> bytes:
    """The "10*" padding of MAC4 (docs/protocol.md, V4)."""
    return message + b"\x80" + b"\x00" * (-(len(message) + 1) % 16)


@pytest.mark.parametrize(
    ("key", "tweak", "block", "expected"),
    [
        (K4, None, ZERO, "933030f10e2e7782b80915d5778a4957"),
        (K5, None, ZERO, "ec7c7e75b1923978eac4b2d2260235d5"),
        (K6, V6_TWEAK, ZERO, "8ca59de0c483c04aa7026a22d6dd208e"),
        (K6, None, ZERO, "b4c3c015f6fb320c9b64aecd52fa58c8"),
        (K6, V6_TWEAK, COUNTING, "ca89ca11b2c4e77a94e806af17136b38"),
    ],
    ids=["E4", "E5", "E6", "AES-K6-untweaked", "E6-counting"],
)
def test_block_known_answers(
    impl: Any, key: bytes, tweak: dict[int, int] | None, block: bytes, expected: str
) -> None:
    cipher = impl(key, tweak)
    assert cipher.encrypt_block(block).hex() == expected
    assert cipher.decrypt_block(bytes.fromhex(expected)) == block


@pytest.mark.parametrize(
    ("cipher", "block", "expected"),
    [
        (E4, ZERO, "933030f10e2e7782b80915d5778a4957"),
        (E5, ZERO, "ec7c7e75b1923978eac4b2d2260235d5"),
        (E6, ZERO, "8ca59de0c483c04aa7026a22d6dd208e"),
        (E6, COUNTING, "ca89ca11b2c4e77a94e806af17136b38"),
    ],
    ids=["E4", "E5", "E6", "E6-counting"],
)
def test_module_ciphers_known_answers(cipher: BlockCipher, block: bytes, expected: str) -> None:
    assert cipher.encrypt_block(block).hex() == expected
    assert cipher.decrypt_block(bytes.fromhex(expected)) == block


def test_module_ciphers_use_the_selected_implementation() -> None:
    forced_pure = os.environ.get("KMSD_PURE_PYTHON", "") not in ("", "0")
    selected = crypto.ACCELERATED_AVAILABLE and not forced_pure
    assert selected == crypto.ACCELERATED
    if IN_CI and not forced_pure:
        assert crypto.ACCELERATED, "the C extension must be built in CI"
    expected = crypto.CRijndael if crypto.ACCELERATED else PyRijndael
    assert crypto.Rijndael is expected
    assert type(E4) is expected and type(E6) is expected
    assert E4.rounds == 11 and E6.rounds == 10


@pytest.mark.system
@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("import os; os.environ['KMSD_PURE_PYTHON'] = '1'", "PyRijndael False"),
        ("import sys; sys.modules['kmsd.protocol._rijndael'] = None", "PyRijndael False"),
    ],
    ids=["env-forces-pure", "extension-missing"],
)
def test_fallback_to_pure_python(setup: str, expected: str) -> None:
    code = (
        f"{setup}\n"
        "from kmsd.protocol import crypto\n"
        "assert crypto.E6.encrypt_block(bytes(16)).hex() == '8ca59de0c483c04aa7026a22d6dd208e'\n"
        "print(type(crypto.E4).__name__, crypto.ACCELERATED)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KMSD_PURE_PYTHON"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


@pytest.mark.system
@pytest.mark.parametrize(
    ("setup", "crypto_field", "warns"),
    [
        ("", "compiled", False),
        ("import os; os.environ['KMSD_PURE_PYTHON'] = '1'", "pure-python", False),
        ("import sys; sys.modules['kmsd.protocol._rijndael'] = None", "pure-python", True),
    ],
    ids=["built", "env-forces-pure", "extension-missing"],
)
def test_daemon_says_which_rijndael_it_runs(setup: str, crypto_field: str, warns: bool) -> None:
    """The ready line names the cipher in use; a missing extension (an install without a
    compiler) is a warning that says what to install, a deliberate KMSD_PURE_PYTHON is not."""
    if not setup and not crypto.ACCELERATED_AVAILABLE:
        pytest.fail("the C extension must be built for this test (gcc and python3-dev)")
    code = (
        f"{setup}\nimport sys\nfrom kmsd.cli import main\n"
        "sys.exit(main(['--listen', '127.0.0.1:0', '--db', ':memory:', '--log-format', 'json']))"
    )
    env = {k: v for k, v in os.environ.items() if k != "KMSD_PURE_PYTHON"}
    kmsd = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=False
    )
    try:
        assert kmsd.stderr is not None
        said = read_until(kmsd.stderr.fileno(), "kmsd ready", time.monotonic() + 60)
    finally:
        kmsd.terminate()
        kmsd.wait(timeout=20)
    events = [json.loads(line) for line in said.splitlines() if line.startswith("{")]
    ready = next(e for e in events if e["event"] == "kmsd ready")
    assert ready["crypto"] == crypto_field
    warnings = [e["event"] for e in events if "compiled Rijndael" in e["event"]]
    assert bool(warnings) == warns, warnings
    if warns:
        assert "gcc and python3-dev" in warnings[0]


def test_v6_round_key_tweak() -> None:
    plain = expand_key(K6)
    tweaked = expand_key(K6, V6_TWEAK)

    def as_hex(words: list[int], r: int) -> str:
        return b"".join(w.to_bytes(4, "big") for w in words[4 * r : 4 * r + 4]).hex()

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


MAC4_CASES = [
    (b"", "d144963029e2bd12f9970c9f52b27f09"),
    (COUNTING, "bc8d323f3fd2fbed498edb35a1042378"),
    (bytes(236), "4c1b4de4008508d66d9ed22963ae52b2"),
]
MAC4_IDS = ["empty", "one-block", "236-zero"]


@pytest.mark.parametrize(("message", "expected"), MAC4_CASES, ids=MAC4_IDS)
def test_mac4_known_answers(message: bytes, expected: str) -> None:
    assert mac4(message).hex() == expected


@pytest.mark.parametrize(("message", "expected"), MAC4_CASES, ids=MAC4_IDS)
def test_cbc_mac_known_answers(impl: Any, message: bytes, expected: str) -> None:
    assert impl(K4).cbc_mac(pad10(message)).hex() == expected


def test_v6_hmac_key_known_answer() -> None:
    assert v6_hmac_key(134403835700000000).hex() == "f53800b1341209c87ab605fcb19a4349"


def check_cbc(cipher: BlockCipher) -> None:
    iv, data = os.urandom(16), os.urandom(240)
    sealed = cipher.cbc_encrypt(iv, data)
    assert cipher.cbc_decrypt(iv, sealed) == data
    # CBC: block 0 is E(P_0 xor IV), block i is E(P_i xor C_{i-1}).
    assert sealed[:16] == cipher.encrypt_block(
        bytes(a ^ b for a, b in zip(data[:16], iv, strict=True))
    )
    assert sealed[16:32] == cipher.encrypt_block(
        bytes(a ^ b for a, b in zip(data[16:32], sealed[:16], strict=True))
    )
    assert cipher.cbc_encrypt(iv, b"") == b"" == cipher.cbc_decrypt(iv, b"")


@pytest.mark.parametrize(("key", "tweak"), [(K4, None), (K6, V6_TWEAK)], ids=["E4", "E6"])
def test_cbc_round_trip_and_chaining(impl: Any, key: bytes, tweak: dict[int, int] | None) -> None:
    check_cbc(impl(key, tweak))


@pytest.mark.parametrize("cipher", [E4, E5, E6], ids=["E4", "E5", "E6"])
def test_module_cbc_round_trip_and_chaining(cipher: BlockCipher) -> None:
    check_cbc(cipher)


@pytest.mark.parametrize("size", [16, 24, 32])
def test_rijndael_equals_aes_for_a_standard_key(impl: Any, size: int) -> None:
    key = os.urandom(size)
    iv, data = os.urandom(16), os.urandom(64)
    ours, aes = impl(key), Aes(key)
    assert ours.cbc_encrypt(iv, data) == aes.cbc_encrypt(iv, data)
    assert ours.cbc_decrypt(iv, data) == aes.cbc_decrypt(iv, data)
    assert ours.encrypt_block(iv) == aes.encrypt_block(iv)
    assert ours.decrypt_block(iv) == aes.decrypt_block(iv)


def random_tweak(rng: random.Random, words: int) -> dict[int, int] | None:
    if rng.random() < 0.25:
        return None
    return {rng.randrange(words): rng.getrandbits(32) for _ in range(rng.randrange(1, 5))}


def test_implementations_agree_on_random_inputs() -> None:
    require_extension()
    rng = random.Random(0x4B4D5344)
    for _ in range(200):
        size = rng.choice([16, 20, 24, 28, 32])
        key = rng.randbytes(size)
        tweak = random_tweak(rng, 4 * (size // 4 + 7))
        pure, fast = PyRijndael(key, tweak), crypto.CRijndael(key, tweak)
        assert fast.rounds == pure.rounds == size // 4 + 6
        block, iv = rng.randbytes(16), rng.randbytes(16)
        data = rng.randbytes(16 * rng.randrange(0, 16))
        assert fast.encrypt_block(block) == pure.encrypt_block(block)
        assert fast.decrypt_block(block) == pure.decrypt_block(block)
        assert fast.decrypt_block(fast.encrypt_block(block)) == block
        sealed = pure.cbc_encrypt(iv, data)
        assert fast.cbc_encrypt(iv, data) == sealed
        assert fast.cbc_decrypt(iv, data) == pure.cbc_decrypt(iv, data)
        assert fast.cbc_decrypt(iv, sealed) == data
        assert fast.cbc_mac(data) == pure.cbc_mac(data)
        # Buffers other than bytes are accepted alike.
        view = memoryview(bytearray(data))
        assert fast.cbc_encrypt(bytearray(iv), view) == pure.cbc_encrypt(bytearray(iv), view)  # type: ignore[arg-type]


def test_aes_contexts_survive_many_messages() -> None:
    """Aes keeps its cryptography contexts across calls; each message stays independent."""
    rng = random.Random(5)
    aes, reference = Aes(K5), PyRijndael(K5)
    for _ in range(50):
        iv, data = rng.randbytes(16), rng.randbytes(16 * rng.randrange(0, 8))
        assert aes.cbc_encrypt(iv, data) == reference.cbc_encrypt(iv, data)
        assert aes.cbc_decrypt(iv, data) == reference.cbc_decrypt(iv, data)
        assert aes.encrypt_block(iv) == reference.encrypt_block(iv)
        assert aes.decrypt_block(iv) == reference.decrypt_block(iv)


def test_aes_cbc_encrypt_from_threads() -> None:
    aes = Aes(K5)
    jobs = [(os.urandom(16), os.urandom(240)) for _ in range(8)]
    expected = [PyRijndael(K5).cbc_encrypt(iv, data) for iv, data in jobs]
    failures: list[int] = []

    def run(index: int) -> None:
        iv, data = jobs[index]
        for _ in range(300):
            if aes.cbc_encrypt(iv, data) != expected[index]:
                failures.append(index)
                return

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_pkcs7() -> None:
    for n in range(33):
        data = os.urandom(n)
        padded = pkcs7_pad(data)
        assert len(padded) % 16 == 0 and len(padded) > n
        assert pkcs7_unpad(padded) == data
    assert pkcs7_unpad(bytes(16)) is None
    assert pkcs7_unpad(b"\x01" * 15 + b"\x02") is None
    assert pkcs7_unpad(b"\x11" * 16) is None


def ciphers_under_test(impl: Any) -> list[Any]:
    return [impl(K4), impl(K6, V6_TWEAK), E5]


def test_cbc_rejects_partial_blocks(impl: Any) -> None:
    for cipher in ciphers_under_test(impl):
        with pytest.raises(ValueError, match="multiple of 16"):
            cipher.cbc_encrypt(ZERO, bytes(15))
        with pytest.raises(ValueError, match="multiple of 16"):
            cipher.cbc_decrypt(ZERO, bytes(17))
        if not isinstance(cipher, Aes):
            with pytest.raises(ValueError, match="multiple of 16"):
                cipher.cbc_mac(bytes(1))


def test_wrong_block_and_iv_sizes_are_value_errors(impl: Any) -> None:
    for cipher in ciphers_under_test(impl):
        for size in (0, 15, 17, 32):
            with pytest.raises(ValueError, match="block must be 16 bytes"):
                cipher.encrypt_block(bytes(size))
            with pytest.raises(ValueError, match="block must be 16 bytes"):
                cipher.decrypt_block(bytes(size))
            with pytest.raises(ValueError, match="iv must be 16 bytes"):
                cipher.cbc_encrypt(bytes(size), bytes(32))
            with pytest.raises(ValueError, match="iv must be 16 bytes"):
                cipher.cbc_decrypt(bytes(size), bytes(32))


def test_bad_keys_are_rejected(impl: Any) -> None:
    for size in (0, 12, 17, 36):
        with pytest.raises(ValueError, match="16 to 32 bytes"):
            impl(bytes(size))


def test_extension_type_guards_its_arguments() -> None:
    require_extension()
    from kmsd.protocol import _rijndael

    with pytest.raises(ValueError, match="key schedule"):
        _rijndael.Rijndael(bytes(100))
    with pytest.raises(ValueError, match="key schedule"):
        _rijndael.Rijndael(bytes(16 * 16))
    with pytest.raises(TypeError):
        _rijndael.Rijndael("not bytes")  # type: ignore[arg-type]
    core = _rijndael.Rijndael(bytes(16 * 11))
    assert core.rounds == 10
    with pytest.raises(TypeError):
        core.encrypt_block(ZERO, ZERO)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        core.cbc_encrypt(ZERO)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        core.cbc_mac(12)  # type: ignore[arg-type]
    blank = _rijndael.Rijndael.__new__(_rijndael.Rijndael)
    with pytest.raises(RuntimeError, match="not initialised"):
        blank.encrypt_block(ZERO)
    # The schedule alone defines the cipher: the same words give the same cipher.
    words = expand_key(K6, V6_TWEAK)
    schedule = b"".join(w.to_bytes(4, "big") for w in words)
    assert _rijndael.Rijndael(schedule).encrypt_block(ZERO) == E6.encrypt_block(ZERO)


@pytest.mark.system
@pytest.mark.skipif(
    not crypto.ACCELERATED, reason="the captured exchanges already ran on pure Python"
)
def test_captured_exchanges_replay_on_pure_python_too() -> None:
    """tests/test_vectors.py again, in a subprocess with KMSD_PURE_PYTHON=1."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_vectors.py"],
        cwd=ROOT,
        env={**os.environ, "KMSD_PURE_PYTHON": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


@pytest.mark.system
def test_the_daemon_does_not_load_cryptography_when_compiled() -> None:
    """With the extension, V5 runs on CRijndael: the daemon's imports leave out
    cryptography and its own OpenSSL (about 7 MiB of resident memory)."""
    require_extension()
    code = (
        "import sys, kmsd.cli, kmsd.server, kmsd.store, kmsd.protocol.kms as k;"
        "print(type(k.E5).__name__, 'cryptography' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "KMSD_PURE_PYTHON"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["CRijndael", "False"], out.stderr
    pure = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**env, "KMSD_PURE_PYTHON": "1"},
    )
    assert pure.stdout.split() == ["Aes", "True"], pure.stderr


@pytest.mark.system
def test_the_daemon_reads_its_data_files_without_importlib_resources() -> None:
    """importlib.resources brings tempfile, shutil and zipfile (about 0.7 MiB resident)
    for two files that lie beside the modules in any install kmsd supports."""
    code = (
        "import sys, kmsd.cli, kmsd.web;"
        "from kmsd.protocol.products import products; products(); kmsd.web._page();"
        "print(sorted({'importlib.resources', 'tempfile'} & set(sys.modules)))"
    )
    # -S: without the .pth files of this machine's site-packages, which may import them
    path = os.pathsep.join([str(ROOT), *site.getsitepackages()])
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert out.stdout.split() == ["[]"], out.stdout + out.stderr


def test_random_pool_hands_out_each_byte_once(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[int] = []
    counter = iter(range(1 << 20))

    def urandom(n: int) -> bytes:  # distinct bytes, so that a repeat would show
        drawn.append(n)
        return bytes(next(counter) % 251 for _ in range(n))

    monkeypatch.setattr("kmsd.protocol.crypto.os.urandom", urandom)
    pool = crypto.RandomPool(block=64)
    pieces = [pool(16), pool(32), pool(16), pool(16), pool(100), pool(8)]
    assert [len(p) for p in pieces] == [16, 32, 16, 16, 100, 8]
    assert drawn == [64, 64, 100, 64]  # refilled when a piece does not fit, sized to fit
    assert pieces[0] + pieces[1] + pieces[2] == bytes(range(64))
    assert pieces[3] == bytes(range(64, 80))
    assert pieces[4] == bytes(i % 251 for i in range(128, 228))
    assert pieces[5] == bytes(i % 251 for i in range(228, 236))


@settings(max_examples=200, derandomize=True, deadline=None)
@given(request_time=st.integers(0, 2**64 - 1), data=st.binary(max_size=300))
def test_v6_mac_is_hmac_sha256_under_the_slot_key(request_time: int, data: bytes) -> None:
    """The keyed states reused per request give what hmac computes from scratch."""
    full = hmac.digest(crypto.v6_hmac_key(request_time), data, "sha256")
    assert crypto.v6_mac(request_time, data) == full[16:]
    assert crypto.v6_mac(request_time, data) == full[16:]  # the cached states stay unused
