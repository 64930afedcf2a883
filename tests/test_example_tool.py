"""The README's example: a small tool (examples/activation_check.py) tested against kmsd's
pytest fixtures. The tool runs as a subprocess, as the tools people test do."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from kmsd.testing import KmsDns, KmsTestHost

TOOL = Path(__file__).parent.parent / "examples" / "activation_check.py"


def run_tool(*args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=60
    )
    return done.returncode, done.stdout.strip()


def test_activated(kms_host: KmsTestHost) -> None:
    kms_host.rule(count=25)
    assert run_tool("--host", kms_host.target) == (0, f"ACTIVATED by {kms_host.target} (count 25)")
    [request] = kms_host.journal
    assert request.product == "Windows 10/11 Enterprise"


def test_below_threshold(kms_host: KmsTestHost) -> None:
    status, line = run_tool("--host", kms_host.target)
    assert (status, line) == (1, f"NOT ACTIVATED by {kms_host.target}: count 1 of 25")


def test_refused_with_an_hresult(kms_host: KmsTestHost) -> None:
    kms_host.rule(product="Windows 10/11 Enterprise", hresult="KMS_ID_MISMATCH", times=1)
    assert run_tool("--host", kms_host.target) == (1, f"REFUSED by {kms_host.target}: 0xC004F042")
    assert run_tool("--host", kms_host.target)[1].startswith("NOT ACTIVATED")  # times=1


def test_silent_host_fails_over_to_the_second(
    kms_hosts: Callable[[int], list[KmsTestHost]],
    kms_dns: Callable[..., KmsDns],
    tmp_path: Path,
) -> None:
    primary, backup = kms_hosts(2)
    primary.rule(close=True)
    backup.rule(count=25)
    dns = kms_dns(primary, backup)
    status, line = run_tool(
        "--domain", dns.zone, "--nameserver", dns.nameserver, "--state", str(tmp_path / "state")
    )
    assert status == 0 and line.startswith("ACTIVATED by ") and line.endswith("(count 25)")
    assert [e.answer for e in primary.journal] == ["close"]
    assert [e.answer for e in backup.journal] == ["count"]


def test_tampered_reply_is_reported_not_genuine(kms_host: KmsTestHost) -> None:
    kms_host.rule(tamper="hmac")
    assert run_tool("--host", kms_host.target) == (
        1,
        f"NOT GENUINE reply from {kms_host.target}: failed check hmac",
    )


def test_31_days_later_the_count_has_dropped(kms_host: KmsTestHost) -> None:
    for _ in range(5):
        run_tool("--host", kms_host.target, "--product", "Windows Server 2022 Standard")
    assert kms_host.counts == {"Windows": 5}
    assert run_tool("--host", kms_host.target, "--product", "Windows Server 2022 Standard")[0] == 0
    kms_host.clock.advance(days=31)
    status, line = run_tool("--host", kms_host.target, "--product", "Windows Server 2022 Standard")
    assert (status, line) == (1, f"NOT ACTIVATED by {kms_host.target}: count 1 of 5")
