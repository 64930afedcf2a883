"""Operator values: each option's range fits where its value goes, NaN and infinity are
refused, at start and at reload (a bad reload changes nothing), and the files kmsd reads
are regular and bounded, read off the event loop on SIGHUP."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kmsclient.session import KmsConnection
from kmsd import config
from kmsd.cli import build_parser
from kmsd.clock import ClockFileError, FileClock
from kmsd.host import KmsHost
from kmsd.protocol.client import base_request
from kmsd.protocol.kms import decode_response, encode_request
from kmsd.protocol.products import products
from kmsd.reload import Reloader
from tests.conftest import KmsdProcess, make_host, start_kmsd, stop_kmsd

WIN = products().sku_by_name("Windows 10/11 Enterprise")
NOW = 1_795_000_000.0
UINT32_MAX = 0xFFFFFFFF


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("KMSD_ACTIVATION_INTERVAL", "4294967296"),  # the wire field has 32 bits
        ("KMSD_RENEWAL_INTERVAL", "4294967296"),
        ("KMSD_FIXED_COUNT", "4294967296"),
        ("KMSD_PRECHARGE", "2147483648"),  # with any table size, the count still fits
        ("KMSD_CAPACITY", "2147483648"),
        ("KMSD_IDLE_TIMEOUT", "nan"),
        ("KMSD_IDLE_TIMEOUT", "inf"),
        ("KMSD_READ_TIMEOUT", "nan"),
        ("KMSD_RATE_PER_IP", "nan"),
        ("KMSD_RATE_PER_IP", "inf"),
        ("KMSD_RECORD_LIFETIME", "nan"),
        ("KMSD_RECORD_LIFETIME", "inf"),
        ("KMSD_HISTORY_DAYS", "nan"),
        ("KMSD_MAX_CLOCK_SKEW", "nan"),
        ("KMSD_MAX_CLOCK_SKEW", "inf"),
        ("KMSD_PUBLISH_INTERVAL", "inf"),
    ],
)
def test_values_that_do_not_fit_are_refused(variable: str, value: str) -> None:
    with pytest.raises(config.ConfigError, match=f"environment {variable}: '{value}' must be"):
        config.resolve({}, {variable: value})


def test_nan_in_the_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "kmsd.toml"
    file.write_text("[network]\nidle_timeout = nan\n[table]\nrecord_lifetime = inf\n")
    with pytest.raises(config.ConfigError) as info:
        config.resolve({"config": str(file)}, {})
    assert "network.idle_timeout: 'nan' must be between" in str(info.value)
    assert "table.record_lifetime: 'inf' must be between" in str(info.value)


def answer(host: KmsHost) -> tuple[int, int, int]:
    assert WIN
    base = base_request(WIN, now=NOW)
    iv = os.urandom(16)
    payload, _ = host.answer(encode_request(base, iv=iv), NOW)
    reply = decode_response(base, iv, payload).base
    return reply.count, reply.activation_interval, reply.renewal_interval


def test_the_largest_values_still_make_an_answer() -> None:
    largest = {"activation_interval": UINT32_MAX, "renewal_interval": UINT32_MAX}
    policy = config.defaults(precharge=0x7FFFFFFF, **largest).host.policy
    assert answer(make_host(policy)) == (0x80000000, UINT32_MAX, UINT32_MAX)
    policy = config.defaults(fixed_count=UINT32_MAX).host.policy
    assert answer(make_host(policy))[0] == UINT32_MAX


def reloader_for(file: Path) -> tuple[Reloader, KmsHost]:
    given = vars(build_parser().parse_args(["--config", str(file)]))
    effective, settings = config.load(given, {})
    host = make_host(settings.host.policy)
    return Reloader(given, effective, settings, host, environ={}, notify=len), host


def test_a_reload_with_a_bad_value_changes_nothing(tmp_path: Path) -> None:
    file = tmp_path / "kmsd.toml"
    file.write_text("[host]\nactivation_interval = 60\n")
    reloader, host = reloader_for(file)
    file.write_text("[host]\nactivation_interval = 30\nrenewal_interval = 4294967296\n")
    assert not reloader.reload()
    assert (host.policy.activation_interval, host.policy.renewal_interval) == (60, 10080)
    assert answer(host)[1:] == (60, 10080)
    file.write_text("[host]\nactivation_interval = 30\n[table]\nprecharge = nan\n")
    assert not reloader.reload()
    assert host.policy.activation_interval == 60 and host.policy.precharge == 0


def finishes(call: Callable[[], Any], timeout: float = 10.0) -> BaseException | None:
    """Run `call` in a thread; what it raised (None: nothing). Fails if it is still
    blocked after `timeout` (the thread is a daemon, so a blocked one does not hang pytest)."""
    raised: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            raised.append(exc)
        else:
            raised.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert raised, f"{call} still blocked after {timeout} s"
    return raised[0]


def test_a_clock_file_holding_no_time_is_refused_and_the_last_time_kept(tmp_path: Path) -> None:
    path = tmp_path / "clock"
    for bad in ("nan", "inf", "-inf", "-5"):
        path.write_text(bad)
        raised = finishes(lambda: FileClock(path))
        assert isinstance(raised, ClockFileError) and "is not a Unix time" in str(raised)
    path.write_text(str(NOW))
    clock = FileClock(path)
    for bad in ("nan", "inf"):
        path.write_text(bad)
        assert clock() == NOW  # the commits that stamp records with it go on
    path.unlink()
    os.mkfifo(path)  # a FIFO: refused at once, never waited on
    assert clock() == NOW
    assert isinstance(finishes(lambda: FileClock(path)), ClockFileError)


def test_files_kmsd_reads_are_regular_and_bounded(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    raised = finishes(lambda: config.resolve({"config": str(fifo)}, {}))
    assert isinstance(raised, config.ConfigError) and "not a regular file" in str(raised)
    big = tmp_path / "big.toml"
    big.write_text("# padding\n" * 200_000)  # 2 MB of comments
    with pytest.raises(config.ConfigError, match="larger than 1048576 bytes"):
        config.resolve({"config": str(big)}, {})
    key = tmp_path / "fifo.key"
    os.mkfifo(key)
    given = {"publish_zone": "lab.test", "publish_key": str(key)}
    raised = finishes(lambda: config.load(given, {}))
    assert isinstance(raised, config.ConfigError) and "not a regular file" in str(raised)


async def test_sighup_reads_the_files_in_a_thread(tmp_path: Path, monkeypatch: Any) -> None:
    file = tmp_path / "kmsd.toml"
    file.write_text("")
    reloader, host = reloader_for(file)
    readers: list[threading.Thread] = []
    resolve = config.resolve

    def recording(*args: Any) -> config.Effective:
        readers.append(threading.current_thread())
        return resolve(*args)

    monkeypatch.setattr(config, "resolve", recording)
    file.write_text("[host]\nactivation_interval = 30\n")
    assert await reloader.reload_off_loop()
    assert readers and readers[0] is not threading.main_thread()
    assert host.policy.activation_interval == 30


async def activate(kmsd: KmsdProcess) -> int:
    assert WIN
    conn = await asyncio.wait_for(KmsConnection.open(kmsd.host, kmsd.port), 10)
    try:
        reply = await asyncio.wait_for(conn.activate(base_request(WIN)), 10)
    finally:
        await conn.close()
    return reply.base.activation_interval


@pytest.mark.system
async def test_a_fifo_for_a_configuration_file_does_not_stop_the_daemon(tmp_path: Path) -> None:
    file = tmp_path / "kmsd.toml"
    file.write_text("[host]\nactivation_interval = 60\n")
    kmsd = start_kmsd("--config", str(file))
    try:
        assert await activate(kmsd) == 60
        file.unlink()
        os.mkfifo(file)
        kmsd.process.send_signal(signal.SIGHUP)
        failed = kmsd.read_log_until("reload failed, running configuration kept")
        assert "not a regular file" in str(failed["problems"])
        assert await activate(kmsd) == 60  # still serving, as configured
    finally:
        assert stop_kmsd(kmsd) == 0
