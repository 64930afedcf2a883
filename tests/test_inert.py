"""Client-chosen strings are inert wherever a person reads them (the console log, the table
commands, kmsclient's report), and exact in every JSON output."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from kmsclient.activation import CallOptions, activate
from kmsclient.outcome import Status
from kmsclient.report import to_text
from kmsclient.session import KmsConnection
from kmsclient.target import Target
from kmsd.protocol.client import base_request, prepare
from kmsd.protocol.products import products
from kmsd.server import KmsServer
from kmsd.text import UNSAFE, inert
from tests.conftest import LOOPBACK, make_host, run_kmsd, server_settings, start_kmsd, stop_kmsd

WIN = products().sku_by_name("Windows 10/11 Enterprise")
# Moves the cursor up, erases the line, starts a CSI (C1), reverses the rest, isolates, ends
# the line: each would forge or hide what an operator reads. (No space, quote or line feed,
# which the log's quoting would escape anyway.)
HOSTILE = "pc\x1b[1A\x1b[2K\x9b31m\u202egpj.exe\u2066x\x7f\u2028y"
SHOWN = "pc\\x1b[1A\\x1b[2K\\x9b31m\\u202egpj.exe\\u2066x\\x7f\\u2028y"
TIMEOUT = 10.0


def assert_inert(text: str) -> None:
    bad = {hex(ord(c)) for c in text if ord(c) in UNSAFE and c != "\n"}
    assert not bad, f"raw control characters {bad} in {text!r}"


def test_inert_escapes_each_unsafe_character_and_nothing_else() -> None:
    assert inert("\x1b[2K") == "\\x1b[2K"
    assert inert("\u202eabc\u2069") == "\\u202eabc\\u2069"
    assert inert("a\tb\r\n\x00\x7f\x85\x9f") == "a\\x09b\\x0d\\x0a\\x00\\x7f\\x85\\x9f"
    for code in UNSAFE:
        assert not chr(code).isprintable()  # what inert's fast path relies on
        assert inert(chr(code)) == repr(chr(code)).strip("'").replace("\\t", "\\x09").replace(
            "\\n", "\\x0a"
        ).replace("\\r", "\\x0d")
    for text in ("pc-01.lab.test", "Müller-PC", "工作站", "ПК-7", "🖥 lab", "a\\x1b", ""):
        assert inert(text) == text


@given(st.text())
def test_inert_output_holds_no_unsafe_character(text: str) -> None:
    out = inert(text)
    assert not any(ord(c) in UNSAFE for c in out)
    assert (out == text) == all(ord(c) not in UNSAFE for c in text)


async def _activate(host: str, port: int, workstation: str) -> int:
    assert WIN
    conn = await KmsConnection.open(host, port)
    try:
        reply = await conn.activate(base_request(WIN, workstation=workstation))
    finally:
        await conn.close()
    return reply.base.count


def _read_until(fd: int, pattern: str, buffer: bytes) -> tuple[re.Match[bytes], bytes]:
    deadline = time.monotonic() + TIMEOUT
    while (match := re.search(pattern.encode(), buffer)) is None:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], f"no {pattern!r}: {buffer!r}"
        chunk = os.read(fd, 65536)
        assert chunk, f"kmsd ended before {pattern!r}: {buffer!r}"
        buffer += chunk
    return match, buffer


async def _console_kmsd_log(db: str, *, tty: bool) -> str:
    """The console log of a kmsd (on a pipe, or on a terminal: the coloured renderer) that
    served one activation from a hostile workstation."""
    if tty:
        reader, writer = pty.openpty()
    else:
        reader, writer = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kmsd", "--listen", f"{LOOPBACK}:0", "--db", db],
        stderr=writer,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "xterm"},
    )
    os.close(writer)
    try:
        match, log = _read_until(reader, r"127\.0\.0\.1:(\d+)", b"")  # "listening"
        _, log = _read_until(reader, "kmsd ready", log)
        assert await _activate(LOOPBACK, int(match[1]), HOSTILE) == 1
        _, log = _read_until(reader, "activation", log)
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)
        os.close(reader)
    return log.decode()


async def test_console_log_and_table_show_a_hostile_workstation_inert(tmp_path: Path) -> None:
    db = str(tmp_path / "kmsd.db")
    for tty in (False, True):
        log = await _console_kmsd_log(db if not tty else ":memory:", tty=tty)
        line = next(x for x in log.splitlines() if "activation" in x)
        assert "\x1b[1A" not in log and "\x1b[2K" not in log and "\u202e" not in log
        assert "\x9b" not in log and "\u2028" not in log and "\x7f" not in log
        assert SHOWN in line
    table = run_kmsd("clients", "--db", db)
    assert table.returncode == 0, table.stderr
    assert_inert(table.stdout)
    assert len(table.stdout.splitlines()) == 2  # the header and one row: none forged
    assert SHOWN in table.stdout
    listing = run_kmsd("clients", "--db", db, "--json")
    assert [row["workstation"] for row in json.loads(listing.stdout)] == [HOSTILE]


async def test_json_log_keeps_the_workstation_exact() -> None:
    kmsd = start_kmsd()
    try:
        await _activate(kmsd.host, kmsd.port, HOSTILE)
        assert kmsd.read_log_until("activation")["workstation"] == HOSTILE
    finally:
        stop_kmsd(kmsd)
    assert_inert("\n".join(json.dumps(entry) for entry in kmsd.log))


async def test_kmsclient_report_shows_what_a_hostile_host_sent_inert() -> None:
    """A host whose ePID ends in a line break, and one whose ePID is terminal escapes: both
    fail the format check, and kmsclient's report shows both inert, its JSON exactly."""
    assert WIN
    genuine = "03612-00206-556-123727-03-1033-17763.0000-2972018"
    for epid in (genuine + "\n", HOSTILE):
        host = make_host()
        host.identity.epids = dict.fromkeys(host.identity.epids, epid)
        srv = KmsServer(host, server_settings())
        await srv.start()
        try:
            base = base_request(WIN, required_count=1)
            result = await activate(Target(*srv.addresses[0]), prepare(base), CallOptions())
        finally:
            await srv.stop()
        assert result.status == Status.NOT_GENUINE
        text = to_text(result)
        assert_inert(text.replace("\n", ""))
        assert len(text.splitlines()) == len(
            [line for line in text.splitlines() if re.match(r"^\S|^  decodes", line)]
        )
        if epid.startswith(genuine):
            assert f"{genuine}\\n' does not have the form" in text
