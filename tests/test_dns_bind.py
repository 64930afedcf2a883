"""kmsd publishes by dynamic update to a real BIND 9, kmsclient discovers through it.

BIND (`named`, Debian's bind9) runs on 127.0.0.1 on a free port with the zone lab.test,
updatable only with a TSIG key; kmsd instances listen on 127.0.0.2, .3, ... as distinct hosts.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsclient import cli as kmsclient_cli

from .bind import WRONG_SECRET, Bind, installed, key_file, running
from .conftest import KmsdProcess, start_kmsd, stop_kmsd

ZONE = "lab.test"
SRV_NAME = f"_vlmcs._tcp.{ZONE}"

if not installed():
    if os.environ.get("CI"):
        raise RuntimeError("bind9 and bind9-dnsutils must be installed (see .ci/run)")
    pytest.skip("BIND 9 (named, dig) is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def bind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bind]:
    yield from running(tmp_path_factory.mktemp("named"), ZONE)


def publishing_kmsd(
    bind: Bind,
    address: str,
    name: str,
    priority: int,
    weight: int,
    *extra: str,
    key: Path | None = None,
) -> KmsdProcess:
    """kmsd on `address` (its own "host"), publishing itself as `name` to BIND, signed
    with `key` (default: the key BIND accepts)."""
    return start_kmsd(
        "--fixed-count",
        "50",
        "--publish-zone",
        ZONE,
        "--publish-server",
        bind.address,
        "--publish-key",
        str(key or bind.key),
        "--publish-host",
        f"{name}.{ZONE}",
        "--publish-priority",
        str(priority),
        "--publish-weight",
        str(weight),
        "--publish-ttl",
        "30",
        *extra,
        listen=f"{address}:0",
    )


def activate(bind: Bind, state: Path, *extra: str) -> dict[str, object]:
    out = io.StringIO()
    argv = ["activate", "--domain", ZONE, "--nameserver", bind.address, "--state", str(state)]
    kmsclient_cli.main([*argv, "--json", "--timeout", "2", *extra], out)
    result: dict[str, object] = json.loads(out.getvalue())
    return result


def attempts(result: dict[str, object]) -> list[tuple[str, str]]:
    discovery = result["discovery"]
    assert isinstance(discovery, dict)
    return [(a["host"], a["status"]) for a in discovery["attempts"]]


def test_publish_dig_discover_activate_withdraw(bind: Bind, tmp_path: Path) -> None:
    kmsd = publishing_kmsd(bind, "127.0.0.2", "kms-a", 0, 10)
    try:
        published = kmsd.read_log_until("dns published")
        assert published["srv"] == f"{SRV_NAME}. 0 10 {kmsd.port} kms-a.{ZONE}."
        assert published["addresses"] == ["127.0.0.2"]
        bind.read_until(f"adding an RR at '{SRV_NAME}' SRV")
        assert bind.dig(SRV_NAME, "SRV") == [f"0 10 {kmsd.port} kms-a.{ZONE}."]
        assert bind.dig(f"kms-a.{ZONE}", "A") == ["127.0.0.2"]
        result = activate(bind, tmp_path / "state.json")
        assert result["status"] == "activated"
        assert result["host"] == f"127.0.0.2:{kmsd.port}"
        assert attempts(result) == [(f"kms-a.{ZONE}", "activated")]
    finally:
        assert stop_kmsd(kmsd) == 0
    assert any(e.get("event") == "dns withdrawn" for e in kmsd.log)
    assert bind.dig(SRV_NAME, "SRV") == []
    assert bind.dig(f"kms-a.{ZONE}", "A") == []


def test_priorities_failover_cache_and_only_own_records_removed(bind: Bind, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    main = publishing_kmsd(bind, "127.0.0.3", "kms-main", 0, 0)
    backups = [
        publishing_kmsd(bind, "127.0.0.4", "kms-b1", 10, 1),
        publishing_kmsd(bind, "127.0.0.5", "kms-b2", 10, 3),
    ]
    everyone = [main, *backups]
    try:
        for kmsd in everyone:
            kmsd.read_log_until("dns published")
        assert bind.dig(SRV_NAME, "SRV") == [
            f"0 0 {main.port} kms-main.{ZONE}.",
            f"10 1 {backups[0].port} kms-b1.{ZONE}.",
            f"10 3 {backups[1].port} kms-b2.{ZONE}.",
        ]
        # Priority 0 first, every time, whatever the weights.
        for _ in range(3):
            state.unlink(missing_ok=True)
            assert attempts(activate(bind, state)) == [(f"kms-main.{ZONE}", "activated")]
        assert json.loads(state.read_text())[ZONE]["name"] == f"kms-main.{ZONE}"

        # The preferred host dies without withdrawing: its records stay, it does not answer.
        main.process.send_signal(signal.SIGKILL)
        main.process.wait(timeout=10)
        result = activate(bind, state)
        assert result["status"] == "activated"
        tried = attempts(result)
        assert tried[0] == (f"kms-main.{ZONE}", "unreachable")  # the cached host first
        assert tried[1][1] == "activated" and tried[1][0] in (f"kms-b1.{ZONE}", f"kms-b2.{ZONE}")
        assert len(tried) == 2  # the dead host is not tried twice
        cached = json.loads(state.read_text())[ZONE]["name"]
        assert cached == tried[1][0]

        # The next activation goes straight to the cached backup.
        again = activate(bind, state)
        assert attempts(again) == [(cached, "activated")]
        assert again["discovery"]["source"] == "cache"  # type: ignore[index]

        # The backups stop cleanly: they remove their own records, not the dead host's.
        for kmsd in backups:
            assert stop_kmsd(kmsd) == 0
        assert bind.dig(SRV_NAME, "SRV") == [f"0 0 {main.port} kms-main.{ZONE}."]
        assert bind.dig(f"kms-b1.{ZONE}", "A") == []
        assert bind.dig(f"kms-main.{ZONE}", "A") == ["127.0.0.3"]
        gone = activate(bind, state)
        assert gone["status"] == "unreachable"
        assert not state.exists() or ZONE not in json.loads(state.read_text())
    finally:
        for kmsd in everyone:
            stop_kmsd(kmsd)
        # Clean the dead host's leftovers for the other tests, as an operator would.
        cleanup = subprocess.run(
            ["nsupdate", "-k", str(bind.key)],
            input=f"server 127.0.0.1 {bind.port}\nzone {ZONE}\n"
            f"update delete {SRV_NAME} SRV\nupdate delete kms-main.{ZONE} A\nsend\n",
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert cleanup.returncode == 0, cleanup.stderr


def test_wrong_key_is_refused_logged_and_kmsd_serves_on(bind: Bind, tmp_path: Path) -> None:
    wrong = key_file(tmp_path / "wrong.key", WRONG_SECRET)
    kmsd = publishing_kmsd(bind, "127.0.0.6", "kms-wrong", 0, 0, key=wrong)
    try:
        failed = kmsd.read_log_until("dns update failed")
        assert failed["rcode"] == "NOTAUTH"
        assert "BADSIG" in str(failed["error"])
        assert failed["retry_in"] == 1.0
        bind.read_until("BADSIG")
        again = kmsd.read_log_until("dns update failed", timeout=5)  # retried, with backoff
        assert again["retry_in"] == 2.0
        assert bind.dig(SRV_NAME, "SRV") == []
        out = io.StringIO()
        assert kmsclient_cli.main(["activate", f"127.0.0.6:{kmsd.port}"], out) == 0
    finally:
        assert stop_kmsd(kmsd) == 0
    assert not any(e.get("event") == "dns withdrawn" for e in kmsd.log)


def test_unsigned_update_is_refused(bind: Bind) -> None:
    kmsd = start_kmsd(
        "--publish-zone",
        ZONE,
        "--publish-server",
        bind.address,
        "--publish-host",
        f"kms-unsigned.{ZONE}",
        listen="127.0.0.7:0",
    )
    try:
        assert kmsd.read_log_until("dns update failed")["rcode"] == "REFUSED"
    finally:
        assert stop_kmsd(kmsd) == 0
