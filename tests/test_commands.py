"""The kmsd commands: each reads the configuration as the daemon does, has its own --help,
and a mistyped one is named."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from kmsclient.session import KmsConnection
from kmsd.protocol.client import base_request
from kmsd.protocol.products import products
from tests.conftest import KmsdProcess, run_kmsd, start_kmsd, stop_kmsd

WIN = products().sku_by_name("Windows 10/11 Enterprise")
DAY = 86400
COMMANDS = (
    "check-config",
    "dns-check",
    "clients",
    "stats",
    "forget",
    "reset",
    "dns-serve",
    "journal",
)


async def activate(kmsd: KmsdProcess) -> int:
    assert WIN
    conn = await KmsConnection.open(kmsd.host, kmsd.port)
    try:
        reply = await asyncio.wait_for(conn.activate(base_request(WIN)), 10)
    finally:
        await conn.close()
    return reply.base.count


async def table_commands_see_the_daemons_table(
    kmsd: KmsdProcess, env: dict[str, str], *args: str
) -> None:
    """Two clients activated; `kmsd clients` and `stats` (given only `env` and `args`, as
    the daemon was) list them, and `forget` takes one out of the daemon's table."""
    await activate(kmsd)
    await activate(kmsd)
    environ = {**os.environ, **env}
    listing = await asyncio.to_thread(run_kmsd, "clients", "--json", *args, env=environ)
    assert listing.returncode == 0, listing.stderr
    clients = json.loads(listing.stdout)
    assert len(clients) == 2
    # The daemon's record lifetime (2 days in these tests), not the default 30.
    assert {c["expires"] - c["recorded_at"] for c in clients} == {2 * DAY}
    stats = await asyncio.to_thread(run_kmsd, "stats", "--json", *args, env=environ)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)[0]["count"] == 2
    victim = clients[0]["client"]
    forget = await asyncio.to_thread(run_kmsd, "forget", victim, "--yes", *args, env=environ)
    assert forget.returncode == 0 and "1 record(s) removed" in forget.stdout, forget.stderr
    assert await activate(kmsd) == 2  # the daemon forgot it: a new client makes 2, not 3


async def test_commands_follow_kmsd_db_and_its_lifetime(tmp_path: Path) -> None:
    env = {"KMSD_DB": str(tmp_path / "env.db"), "KMSD_RECORD_LIFETIME": "2"}
    kmsd = start_kmsd(db=None, env=env)
    try:
        await table_commands_see_the_daemons_table(kmsd, env)
    finally:
        assert stop_kmsd(kmsd) == 0


async def test_commands_follow_the_configuration_file(tmp_path: Path) -> None:
    file = tmp_path / "kmsd.toml"
    file.write_text(f'[table]\ndb = "{tmp_path / "file.db"}"\nrecord_lifetime = 2\n')
    kmsd = start_kmsd("--config", str(file), db=None)
    try:
        await table_commands_see_the_daemons_table(kmsd, {}, "--config", str(file))
        # $KMSD_CONFIG names the same file for the commands too.
        listing = run_kmsd("clients", env={**os.environ, "KMSD_CONFIG": str(file)})
        assert listing.returncode == 0 and len(listing.stdout.splitlines()) == 3  # header + 2
    finally:
        assert stop_kmsd(kmsd) == 0


def test_commands_report_configuration_errors_as_the_daemon_does(tmp_path: Path) -> None:
    env = {**os.environ, "KMSD_RECORD_LIFETIME": "-1"}
    for command in (["clients"], ["stats"], ["forget", "x", "--yes"], ["reset", "--yes"], []):
        result = run_kmsd(*command, "--db", str(tmp_path / "x.db"), env=env)
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.startswith("kmsd: configuration error:\nenvironment "), command
        assert "KMSD_RECORD_LIFETIME: '-1' must be" in result.stderr


def test_a_mistyped_command_is_named_with_the_list() -> None:
    result = run_kmsd("client")
    assert result.returncode == 2
    first, *rest = result.stderr.splitlines()
    assert first == "kmsd: unknown command 'client'; did you mean 'clients'?"
    assert [line.split()[0] for line in rest[1:]] == list(COMMANDS)
    assert run_kmsd("bogus").stderr.startswith("kmsd: unknown command 'bogus'\n")


def test_every_command_has_its_own_help() -> None:
    daemon = run_kmsd("--help").stdout
    for command in COMMANDS:
        shown = run_kmsd(command, "--help")
        assert shown.returncode == 0
        assert shown.stdout.startswith(f"usage: kmsd {command} "), command
        assert shown.stdout != daemon
    check = run_kmsd("check-config", "--help").stdout
    assert "Check the configuration" in check and "--listen HOST:PORT" in check
    assert "--db PATH" in run_kmsd("clients", "--help").stdout
    serve = run_kmsd("dns-serve", "--help").stdout
    assert "--log-format {console,json}" in serve and "human-readable lines" in serve
    assert "--listen HOST:PORT" not in serve  # not the daemon's own


def test_a_database_in_a_missing_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "dir" / "kmsd.db"
    result = run_kmsd("--db", str(path), "--listen", "127.0.0.1:0")
    assert result.returncode == 1
    assert "no such directory" in result.stderr and not (tmp_path / "missing").exists()


def test_list_variables_are_comma_separated_and_a_malformed_one_refused() -> None:
    env = {**os.environ, "KMSD_LISTEN": "127.0.0.1:1688,[::1]:1700"}
    shown = run_kmsd("check-config", env=env)
    assert 'listen = ["127.0.0.1:1688", "[::1]:1700"]  # environment' in shown.stdout
    for name, value in (
        ("KMSD_LISTEN", "127.0.0.1:1688 127.0.0.2:1688"),
        ("KMSD_ALLOW", "10.0.0.0/8 192.168.0.0/16"),
        ("KMSD_EPID", "Windows 10/11 (Volume)=X Office=Y"),
    ):
        result = run_kmsd("check-config", env={**os.environ, name: value})
        assert result.returncode == 2, name
        assert f"environment {name}: " in result.stderr
    spaced = run_kmsd("check-config", env={**os.environ, "KMSD_LISTEN": "a b:1"}).stderr
    assert "is neither an IP address nor a host name (a list is comma-separated here)" in spaced
    assert "[KMSD_LISTEN, comma-separated]" in " ".join(run_kmsd("--help").stdout.split())


def test_a_mistyped_option_is_two_lines_with_the_closest() -> None:
    for argv, first in (
        (["--lisen", "127.0.0.1:1"], "kmsd: error: unrecognized arguments: --lisen "),
        (["clients", "--dbb", "x"], "kmsd clients: error: unrecognized arguments: --dbb x"),
        (["check-config", "--rule", "delay=301"], "kmsd check-config: error: argument --rule"),
    ):
        done = run_kmsd(*argv)
        assert done.returncode == 2
        lines = done.stderr.splitlines()
        assert len(lines) == 2 and lines[0].startswith(first), done.stderr
        assert "usage:" not in done.stderr
    assert run_kmsd("--lisen", "x").stderr.splitlines()[0].endswith("; did you mean --listen?")


def test_the_daemon_does_not_import_what_only_mistakes_and_files_need() -> None:
    """argparse's terminal width (shutil, bz2, lzma), difflib and tomllib: ~1.6 MiB that a
    daemon started without a configuration file would keep for nothing."""
    code = (
        "import sys\nfrom kmsd.cli import build_parser\nbuild_parser().format_help()\n"
        "print(sorted({'shutil', 'bz2', 'lzma', 'difflib', 'tomllib'} & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
