"""SIGHUP reload: the file and environment again, applied to the running kmsd; and --user."""

from __future__ import annotations

import asyncio
import io
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import cast

import pytest
import structlog

from kmsclient.session import KmsConnection
from kmsd import config, logs
from kmsd.cli import build_parser
from kmsd.dns.publish import PublishSettings
from kmsd.protocol.client import base_request
from kmsd.protocol.kms import BaseResponse
from kmsd.protocol.products import products
from kmsd.reload import Reloader
from tests.conftest import LOOPBACK, KmsdProcess, make_host, run_kmsd, start_kmsd, stop_kmsd

WIN = products().sku_by_name("Windows 10/11 Enterprise")
TIMEOUT = 10.0


async def activate(kmsd: KmsdProcess) -> BaseResponse:
    assert WIN
    conn = await asyncio.wait_for(KmsConnection.open(kmsd.host, kmsd.port), TIMEOUT)
    try:
        reply = await asyncio.wait_for(conn.activate(base_request(WIN)), TIMEOUT)
    finally:
        await conn.close()
    return reply.base


def reload(kmsd: KmsdProcess) -> None:
    kmsd.process.send_signal(signal.SIGHUP)


async def test_sighup_applies_the_new_file(tmp_path: Path) -> None:
    file = tmp_path / "kmsd.toml"
    file.write_text("[host]\nactivation_interval = 120\nrenewal_interval = 10080\n")
    # The command line stays as given: its idle timeout is kept whatever the file says.
    kmsd = start_kmsd("--config", str(file), "--idle-timeout", "25")
    try:
        first = await activate(kmsd)
        assert (first.activation_interval, first.renewal_interval, first.count) == (120, 10080, 1)
        assert not [e for e in kmsd.log if e.get("event") == "connection opened"]  # info level
        file.write_text(
            "[host]\nactivation_interval = 30\nrenewal_interval = 1440\n"
            "[table]\nprecharge = 10\n"
            "[network]\nidle_timeout = 5\nmax_pdu = 4000\n"  # a restart for max_pdu only
            '[logging]\nlog_level = "debug"\n'
        )
        reload(kmsd)
        changes = {str(kmsd.read_log_until("configuration reloaded")["option"]) for _ in range(4)}
        assert changes == {
            "host.activation_interval",
            "host.renewal_interval",
            "table.precharge",
            "logging.log_level",
        }
        restart = kmsd.read_log_until("changed options need a restart")
        assert restart["level"] == "warning" and restart["options"] == ["network.max_pdu"]
        second = await activate(kmsd)
        assert (second.activation_interval, second.renewal_interval) == (30, 1440)
        assert second.count == 2 + 10
        kmsd.read_log_until("connection opened")  # debug now
        # A broken file: reported, and everything stays as it runs.
        file.write_text("[host]\nrenewal_interval = -1\nbogus = 1\n")
        reload(kmsd)
        failed = kmsd.read_log_until("reload failed, running configuration kept")
        assert failed["level"] == "error"
        problems = "\n".join(map(str, cast(list[object], failed["problems"])))
        assert "host.renewal_interval: '-1' must be between 1 and 4294967295" in problems
        assert "host.bogus: unknown option" in problems
        third = await activate(kmsd)
        assert (third.activation_interval, third.renewal_interval) == (30, 1440)
        # The file back as it was: the intervals too, and the restart warning is gone.
        file.write_text("[host]\nactivation_interval = 120\nrenewal_interval = 10080\n")
        reload(kmsd)
        kmsd.read_log_until("configuration reloaded")
        fourth = await activate(kmsd)
        assert (fourth.activation_interval, fourth.renewal_interval) == (120, 10080)
    finally:
        assert stop_kmsd(kmsd) == 0
    assert len([e for e in kmsd.log if e.get("event") == "changed options need a restart"]) == 1


async def test_kmsd_stats_follows_an_override_changed_by_a_reload(tmp_path: Path) -> None:
    """`kmsd stats` run without the daemon's file reads the override the daemon recorded;
    a reload that changes it records the new one."""
    file, db = tmp_path / "kmsd.toml", str(tmp_path / "kmsd.db")
    file.write_text("[table]\nprecharge = 10\n")
    kmsd = start_kmsd("--config", str(file), db=db)
    try:
        assert (await activate(kmsd)).count == 11

        def override() -> object:
            (row,) = json.loads(run_kmsd("stats", "--db", db, "--json").stdout)
            return row["override"]

        assert override() == "precharge 10"
        file.write_text("[table]\nfixed_count = 50\n")
        reload(kmsd)
        kmsd.read_log_until("configuration reloaded")
        assert (await activate(kmsd)).count == 50
        assert override() == "fixed count 50"
    finally:
        assert stop_kmsd(kmsd) == 0


def test_reloader_applies_epids_strict_and_skew_in_process(tmp_path: Path) -> None:
    file = tmp_path / "kmsd.toml"
    file.write_text("")
    given = vars(build_parser().parse_args(["--config", str(file)]))
    effective, settings = config.load(given, {})
    host = make_host()
    notes: list[str] = []
    reloader = Reloader(given, effective, settings, host, environ={}, notify=notes.append)
    epid = "03612-00206-556-123727-03-1033-17763.0000-2972018"
    file.write_text(
        f'[host]\nstrict = true\nmax_clock_skew = 4\nepid = ["Windows 10/11 Enterprise={epid}"]\n'
    )
    assert reloader.reload()
    assert host.policy.strict and host.policy.max_clock_skew == 4 * 3600
    assert WIN and host.identity.overrides == {WIN.kms.id: epid}
    assert notes == [
        "RELOADING=1\nSTATUS=reloading the configuration",
        "READY=1\nSTATUS=configuration reloaded",
    ]
    # The environment is read again too (and wins over the file).
    reloader.environ = {"KMSD_STRICT": "false", "KMSD_HWID": "0011223344556677"}
    assert reloader.reload()
    assert not host.policy.strict
    assert notes[-1] == "READY=1\nSTATUS=configuration reloaded; restart needed for host.hwid"


def test_set_level_reaches_loggers_already_cached() -> None:
    out = io.StringIO()
    logger = structlog.wrap_logger(
        structlog.PrintLogger(out),
        wrapper_class=logs._Logger,
        processors=[structlog.processors.KeyValueRenderer(key_order=["event"])],
        cache_logger_on_first_use=True,
    )
    before = logs.current_level()
    try:
        logs.set_level("info")
        logger.debug("hidden")
        logger.info("shown")
        logs.set_level("debug")
        logger.debug("now shown")
        logs.set_level("error")
        logger.warning("hidden again")
        assert logger.is_enabled_for(40) and not logger.is_enabled_for(30)
    finally:
        logs.set_level(before)
    assert out.getvalue().split() == ["event='shown'", "event='now", "shown'"]


# --user: privileges dropped after binding and opening the database.

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def status_ids(pid: int) -> dict[str, list[int]]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {
        key: [int(v) for v in rest.split()]
        for key, _, rest in (line.partition(":") for line in lines)
        if key in ("Uid", "Gid", "Groups")
    }


@as_root
async def test_root_drops_to_user_after_binding(request: pytest.FixtureRequest) -> None:
    nobody = pwd.getpwnam("nobody")
    # Outside pytest's directory, which only root may enter: the user must reach the
    # database (tests/test_store.py: what happens when it cannot).
    base = Path(tempfile.mkdtemp())
    base.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(base))
    state = base / "kmsd"
    state.mkdir(mode=0o700)
    db = state / "kmsd.db"
    kmsd = start_kmsd("--user", "nobody", db=str(db))
    try:
        ids = status_ids(kmsd.process.pid)
        assert ids["Uid"] == [nobody.pw_uid] * 4  # real, effective, saved, file system
        assert ids["Gid"] == [nobody.pw_gid] * 4
        assert 0 not in ids["Groups"]
        assert any(e.get("event") == "running as user" for e in kmsd.log)
        assert (await activate(kmsd)).count == 1  # the database is written as nobody
        assert db.stat().st_uid == nobody.pw_uid and state.stat().st_uid == nobody.pw_uid
    finally:
        assert stop_kmsd(kmsd) == 0
    assert not [e for e in kmsd.log if e.get("level") == "error"]


def test_unknown_user_is_refused_before_anything_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kmsd", "--user", "no-such-user-kmsd", "--listen", f"{LOOPBACK}:0"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 2
    assert "command line" in result.stderr or "no such user" in result.stderr
    assert "'no-such-user-kmsd': no such user" in result.stderr


class FakePublications:
    def __init__(self) -> None:
        self.targets: list[tuple[PublishSettings, ...]] = []

    def apply(self, targets: tuple[PublishSettings, ...]) -> None:
        self.targets.append(targets)


def test_reload_reconfigures_dns_publication(tmp_path: Path) -> None:
    file = tmp_path / "kmsd.toml"
    dns = '[dns]\npublish_zone = "lab.test"\npublish_server = "127.0.0.1:5300"\n'
    file.write_text(dns)
    given = vars(build_parser().parse_args(["--config", str(file)]))
    publications = FakePublications()
    reloader = Reloader(
        given,
        *config.load(given, {}),
        make_host(),
        publications,  # type: ignore[arg-type]
        environ={},
        notify=len,
    )
    file.write_text(dns + "publish_ttl = 60\npublish_priority = 5\n")
    assert reloader.reload()
    ((settings,),) = publications.targets
    assert (settings.ttl, settings.priority, settings.zone.to_text()) == (60, 5, "lab.test.")
    # Another zone needs a restart: the publisher is left alone.
    file.write_text(
        dns.replace("lab.test", "other.test") + "publish_ttl = 60\npublish_priority = 5\n"
    )
    assert reloader.reload()
    assert len(publications.targets) == 1
    assert reloader.effective.values["publish_zone"] == "lab.test"
    # Targets come and go with a reload.
    target = '[[dns.publish_target]]\nzone = "corp.test"\nserver = "127.0.0.1:5301"\nweight = 7\n'
    file.write_text(dns + "publish_ttl = 60\npublish_priority = 5\n" + target)
    assert reloader.reload()
    assert [(t.zone.to_text(), t.weight) for t in publications.targets[-1]] == [
        ("lab.test.", 0),
        ("corp.test.", 7),
    ]
    file.write_text(dns + "publish_ttl = 60\npublish_priority = 5\n")
    assert reloader.reload()
    assert [t.zone.to_text() for t in publications.targets[-1]] == ["lab.test."]
