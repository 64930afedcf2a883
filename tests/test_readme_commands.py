"""The README's `kmsd` and `kmsclient` commands, run as written (on loopback), so that a renamed
option, a changed exit status or a changed log line fails here instead of for a reader.

Every line of a README code block that starts with `kmsd`, `kmsclient` or `echo` is run,
except synopses (`[--json]`, `CLIENT_ID`) and the lines EXCLUDED names with a reason. Rewrites,
and only these: a daemon listens on loopback port 0 (`--listen` ports become 0, or
`--listen 127.0.0.1:0` is added) with `--db :memory:` unless it names a database; a client's
`127.0.0.1` or `127.0.0.1:1688` becomes the address of a kmsd started for the test; a block
that uses fixed ports and files (the clock-file example) gets free ports and a temporary
directory in their place. Daemons must report ready and stop with status 0 on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import readme
from tests.conftest import free_tcp_port, read_until

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 120.0

# Lines that cannot run on loopback here, by their start, with the reason.
EXCLUDED = {
    "kmsclient activate kms.lab ": "a lab host name, resolved by the reader's DNS",
    "kmsd --publish-zone lab.test --publish-server 192.0.2.53 ": "publishes to a DNS server "
    "at a documentation address (tests/test_dns_bind.py runs publication against BIND)",
    "kmsclient activate --domain lab.test ": "discovers kmsd hosts on 127.0.0.2/3:1688 "
    "(tests/test_dns_resolver.py covers discovery)",
    "kmsclient discover lab.test ": "probes kmsd hosts on 127.0.0.2/3:1688",
}
# Exit statuses a client line may end with (README, "kmsclient"): the first Windows client of a
# fresh host is below its threshold (3).
ALLOWED_STATUS = {"activate": {0, 3}, "charge": {0}, "load": {0}, "simulate": {0}}


def commands() -> list[tuple[int, str]]:
    """(block number, command line) of every README line this test runs or excludes."""
    found = []
    for number, block in enumerate(readme.code_blocks()):
        for line in readme.shell_lines(block):
            if line.split()[0] in ("kmsd", "kmsclient", "echo") and not synopsis(line):
                found.append((number, line))
    return found


def synopsis(line: str) -> bool:
    """`kmsd forget CLIENT_ID [--yes]`: a usage line, not a command."""
    words = shlex.split(line.removesuffix("&"))[1:]
    return "[--" in line or any(re.fullmatch(r"[A-Z][A-Z_]+", w) for w in words)


def excluded(line: str) -> str | None:
    return next((why for start, why in EXCLUDED.items() if line.startswith(start)), None)


def argv(words: list[str]) -> list[str]:
    return [sys.executable, "-m", words[0], *words[1:]]


def is_daemon(words: list[str]) -> bool:
    """kmsd itself (options only, or dns-serve), not a table command or --help."""
    if words[0] != "kmsd" or "--help" in words:
        return False
    return len(words) == 1 or words[1].startswith("-") or words[1] == "dns-serve"


def on_loopback(words: list[str]) -> list[str]:
    """A daemon's words with every --listen port 0 (or one --listen 127.0.0.1:0)."""
    out = list(words)
    listens = [i + 1 for i, w in enumerate(out) if w == "--listen"]
    for i in listens:
        out[i] = re.sub(r":\d+$", ":0", out[i])
    if not listens:
        out += ["--listen", "127.0.0.1:0"]
    if words[1:2] != ["dns-serve"] and "--db" not in out:
        out += ["--db", ":memory:"]
    return out


class Daemon:
    """A README daemon line, running: started, ready, its log read all the time (so that
    it never stalls on a full pipe), stopped with SIGTERM and expected to exit 0."""

    def __init__(self, words: list[str], cwd: Path) -> None:
        self.words = words
        self.proc = subprocess.Popen(
            argv(words), cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        assert self.proc.stderr is not None
        self.fd = self.proc.stderr.fileno()
        self.log = read_until(self.fd, "ready", time.monotonic() + TIMEOUT)
        if "ready" not in self.log:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"{shlex.join(words)} did not become ready:\n{self.log}")
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()

    def _drain(self) -> None:
        while chunk := os.read(self.fd, 65536):
            self.log += chunk.decode(errors="replace")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(timeout=30)
        self.reader.join(timeout=10)
        assert status == 0, f"{shlex.join(self.words)} exited {status} on SIGTERM"


def run_client(words: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv(words), cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    allowed = ALLOWED_STATUS.get(words[1], {0})
    assert done.returncode in allowed, (
        f"{shlex.join(words)} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    )
    return done


class Host(Daemon):
    """The kmsd that client lines' 127.0.0.1 and 127.0.0.1:1688 stand for."""

    def __init__(self) -> None:
        words = ["kmsd", "--listen", "127.0.0.1:0", "--db", ":memory:", "--log-format", "json"]
        super().__init__(words, ROOT)
        listening = next(json.loads(x) for x in self.log.splitlines() if '"listening"' in x)
        self.address: str = listening["address"]


@pytest.fixture(scope="module")
def kmsd() -> Iterator[Host]:
    host = Host()
    yield host
    host.stop()


def test_exclusions_still_match_a_readme_line() -> None:
    lines = [line for _, line in commands()]
    for start in EXCLUDED:
        assert any(line.startswith(start) for line in lines), f"stale exclusion {start!r}"


def test_commands_found() -> None:
    """The README shows daemons, table and client commands: the extraction finds them."""
    lines = [line for _, line in commands()]
    assert sum(is_daemon(line.split()) for line in lines) >= 6
    assert sum(line.startswith("kmsclient ") for line in lines) >= 6


def blocks() -> dict[int, list[str]]:
    by_block: dict[int, list[str]] = {}
    for number, line in commands():
        if excluded(line) is None:
            by_block.setdefault(number, []).append(line)
    return by_block


@pytest.mark.parametrize("number", sorted(blocks()))
def test_readme_block_runs(number: int, kmsd: Host, tmp_path: Path) -> None:
    lines = blocks()[number]
    script = "\n".join(lines)
    # A block that names its own ports and files (the clock-file example) gets its own.
    for port in sorted(set(re.findall(r"127\.0\.0\.1:(\d+)", script)) - {"1688"}):
        script = script.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_tcp_port()}")
    script = script.replace("/tmp/", f"{tmp_path}/")
    background: list[Daemon] = []
    try:
        for line in script.splitlines():
            words = shlex.split(line.removesuffix("&").strip())
            scenario = next((w for w in words if w.startswith("scenarios/")), None)
            if scenario is not None:  # run from a scratch directory (--chart writes there)
                words = [str(ROOT / w) if w == scenario else w for w in words]
            if words[0] == "echo":
                subprocess.run(["sh", "-c", line], cwd=tmp_path, check=True, timeout=30)
            elif is_daemon(words):
                daemon = Daemon(words if line.endswith("&") else on_loopback(words), tmp_path)
                if line.endswith("&"):
                    background.append(daemon)
                else:
                    daemon.stop()
            else:
                host = kmsd.address
                words = [host if w in ("127.0.0.1", "127.0.0.1:1688") else w for w in words]
                done = run_client(words, tmp_path)
                if words[0] == "kmsd" and "--help" in words:
                    assert "usage: kmsd" in done.stdout
    finally:
        for daemon in background:
            daemon.stop()


def test_readme_activation_log_line_shows_fields_kmsd_logs(kmsd: Host) -> None:
    """The example log line's fields are the ones kmsd writes."""
    example = next(b for b in readme.code_blocks() if "[info] activation" in b)
    shown = set(re.findall(r"(\w+)=", example))
    workstation = "readme-fields.lab.test"
    run_client(["kmsclient", "activate", kmsd.address, "--workstation", workstation], ROOT)
    deadline = time.monotonic() + TIMEOUT
    while workstation not in kmsd.log and time.monotonic() < deadline:
        kmsd.reader.join(timeout=0.05)  # the reader thread appends the log
    logged = next(
        json.loads(x) for x in kmsd.log.splitlines() if workstation in x and "activation" in x
    )
    assert shown <= set(logged), shown - set(logged)
