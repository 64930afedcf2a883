"""Fleet simulation: the seed's stories replayed in virtual time, to the minute; the same
scenario in process, in process over the wire encoding, and against real kmsd daemons."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from kmsclient.cli import main as kmsclient_main
from kmsclient.licensing import DAY, HOUR
from kmsclient.sim import chart, timeline
from kmsclient.sim.fleet import InProcess, Loopback, Timeline, simulate, write_clock
from kmsclient.sim.scenario import ScenarioError, from_dict, load, parse_duration
from kmsclient.target import Target
from kmsd.clock import FileClock

from .conftest import KmsdProcess, start_kmsd

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"


async def run(name: str, *, wire: bool = False) -> Timeline:
    scenario = load(SCENARIOS / f"{name}.toml")
    return await simulate(scenario, InProcess(scenario, wire=wire), keep_events=True)


def when(tl: Timeline, client: str, kind: str) -> list[str]:
    assert tl.events is not None
    return [timeline.at(e.offset) for e in tl.events if e.client == client and e.kind == kind]


def counts(tl: Timeline, client: str) -> list[int | None]:
    assert tl.events is not None
    return [e.count for e in tl.events if e.client == client and e.count is not None]


async def test_seed_threshold_24_wait_and_the_25th_activates_them() -> None:
    tl = await run("seed-threshold")
    # Each of the 24 asked every 2 hours from its join, with counts 1..24 at first.
    assert [counts(tl, f"win-{i:02d}")[0] for i in range(1, 25)] == list(range(1, 25))
    assert when(tl, "win-01", "below")[:3] == ["0d 00:00", "0d 02:00", "0d 04:00"]
    assert when(tl, "win-01", "below")[-1] == "2d 08:00"
    assert when(tl, "win25-01", "activated") == ["2d 09:30"]
    assert counts(tl, "win25-01")[0] == 25
    for i in range(1, 25):  # joined at hour i-1: asks on even or odd hours
        expected = "2d 10:00" if i % 2 else "2d 11:00"
        assert when(tl, f"win-{i:02d}", "activated") == [expected], i
        assert when(tl, f"win-{i:02d}", "renewed") == ["9" + expected[1:]], i
    assert when(tl, "win25-01", "renewed") == ["9d 09:30"]
    win = tl.groups[0]
    assert win.first_activated == 2 * DAY + 10 * HOUR
    assert win.all_licensed == 2 * DAY + 11 * HOUR
    assert tl.totals["activated"] == 25 and tl.totals["expired"] == 0
    by_day = {s.offset: s for s in tl.samples}
    assert by_day[2 * DAY + 10 * HOUR].licensed == {"win": 0, "win25": 1}
    assert by_day[2 * DAY + 11 * HOUR].licensed == {"win": 12, "win25": 1}
    assert by_day[2 * DAY + 12 * HOUR].licensed == {"win": 24, "win25": 1}


async def test_seed_dropout_records_expire_after_30_days_and_activations_after_180() -> None:
    tl = await run("seed-dropout")
    assert when(tl, "stay-15", "activated") == ["0d 00:58"]  # the 25th client
    assert when(tl, "leave-01", "activated") == ["0d 02:00"]
    assert when(tl, "stay-01", "activated") == ["0d 02:30"]
    # The leavers renew on days 7 and 14 and leave on day 20.
    assert when(tl, "leave-10", "renewed") == ["7d 02:18", "14d 02:18"]
    # Their records count until 44d 02:00-02:18: the renewal at 42d still gets 25, the
    # one at 49d gets 15.
    renewals = [f"{d}d 02:30" for d in range(7, 43, 7)]
    assert when(tl, "stay-01", "renewed") == renewals
    assert when(tl, "stay-01", "below")[:3] == ["0d 00:30", "49d 02:30", "49d 04:30"]
    assert counts(tl, "stay-01")[:2] == [11, 25]
    assert counts(tl, "stay-01")[2 + len(renewals) :][:2] == [15, 15]
    # Still licensed while it retries every 2 hours; expired 180 days after 42d 02:30.
    assert when(tl, "stay-01", "expired") == ["222d 02:30"]
    assert when(tl, "stay-15", "expired") == ["222d 00:58"]
    assert tl.totals["expired"] == 15 and tl.totals["left"] == 10
    licensed = {round(s.offset / DAY): sum(s.licensed.values()) for s in tl.samples}
    assert licensed[1] == 25 and licensed[20] == 25 and licensed[21] == 15
    assert licensed[222] == 15 and licensed[223] == 0


async def test_seed_servers_table_of_10_grows_to_50_at_the_first_client() -> None:
    tl = await run("seed-servers")
    first = [counts(tl, f"server-{i:02d}")[0] for i in range(1, 13)]
    assert first == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 10]  # the table holds 10
    assert when(tl, "server-05", "activated") == ["0d 04:00"]
    assert when(tl, "server-01", "activated") == ["0d 04:00"]
    assert when(tl, "win-01", "below")[0] == "2d 00:00"
    assert counts(tl, "win-01")[0] == 11  # the table grew to 50
    assert [counts(tl, f"win-{i:02d}")[0] for i in range(1, 31)] == list(range(11, 41))
    assert when(tl, "win-15", "activated") == ["2d 14:00"]
    assert tl.groups[1].all_licensed == 3 * DAY + 5 * HOUR


async def test_failover_story_with_three_hosts() -> None:
    tl = await run("failover-3-hosts")
    scenario = tl.scenario
    down = {h.name: h.down for h in scenario.hosts}
    assert tl.events is not None
    for e in tl.events:
        if e.kind == "failover":
            assert e.host is not None and down[e.host](e.offset), e
        elif e.count is not None:
            assert e.host is not None and not down[e.host](e.offset), e
    assert tl.totals["failed"] == 0 and tl.totals["failover"] > 0
    # Before day 14 only the two priority-0 hosts are used, kms1 about 60% of the time.
    early = [e for e in tl.events if e.offset < 10 * DAY and e.count is not None]
    assert {e.host for e in early} == {"kms1", "kms2"}
    # Day 14: kms2 is down too: the backup kms3 has counted nobody, so the first Windows
    # renewals it gets are below 25 while those clients stay licensed.
    on_kms3 = [e for e in tl.events if e.host == "kms3" and e.count is not None]
    assert on_kms3[0].offset >= 14 * DAY and on_kms3[0].count == 1
    assert on_kms3[0].kind == "below" and on_kms3[0].state == "renewal_due"
    # Once a client answered from kms3 it stays there (it is cached and keeps answering).
    moved = {e.client for e in on_kms3}
    assert all(e.host == "kms3" for e in tl.events if e.client in moved and e.offset > 16 * DAY)
    assert all(g.licensed_at_end == g.clients for g in tl.groups)
    assert tl.totals["expired"] == 0


def _comparable(tl: Timeline) -> dict[str, Any]:
    data = timeline.to_json(tl)
    del data["mode"]
    return data


async def test_direct_and_wire_in_process_agree() -> None:
    for name in ("seed-threshold", "seed-servers"):
        direct, wire = await run(name), await run(name, wire=True)
        assert wire.mode == "in-process (wire)"
        assert _comparable(direct) == _comparable(wire)


@pytest.mark.system
@pytest.mark.parametrize("name", ["seed-threshold", "failover-3-hosts"])
async def test_real_kmsd_over_loopback_agrees_with_the_in_process_run(
    name: str, tmp_path: Path
) -> None:
    scenario = load(SCENARIOS / f"{name}.toml")
    clock = tmp_path / "clock"
    write_clock(clock, scenario.start)
    daemons = [start_kmsd("--clock-file", str(clock)) for _ in scenario.hosts]
    readers = [_read_log(d) for d in daemons]  # a full stderr pipe would stop kmsd
    try:
        targets = {
            h.name: Target(d.host, d.port) for h, d in zip(scenario.hosts, daemons, strict=True)
        }
        real = await simulate(scenario, Loopback(targets, clock), keep_events=True)
    finally:
        for daemon in daemons:
            daemon.process.send_signal(signal.SIGTERM)
        for daemon, reader in zip(daemons, readers, strict=True):
            daemon.process.wait(timeout=10)
            reader.join(timeout=10)
    local = await simulate(scenario, InProcess(scenario), keep_events=True)
    assert real.mode == "kmsd over loopback"
    assert _comparable(real) == _comparable(local)
    logged = sum(1 for d in daemons for e in d.log if e.get("event") == "activation")
    assert logged == real.totals["requests"] - real.totals["failover"] - real.totals["failed"]


def _read_log(kmsd: KmsdProcess) -> threading.Thread:
    """Read the daemon's log until it exits, in a thread."""
    assert kmsd.process.stderr is not None
    fd = kmsd.process.stderr.fileno()

    def read() -> None:
        for chunk in iter(lambda: os.read(fd, 65536), b""):
            kmsd._take_lines(chunk)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_cli_simulate_text_json_and_chart(tmp_path: Path) -> None:
    out = io.StringIO()
    svg = tmp_path / "chart.svg"
    path = str(SCENARIOS / "seed-threshold.toml")
    assert kmsclient_main(["simulate", path, "--json", "--events", "--chart", str(svg)], out) == 0
    data = json.loads(out.getvalue())
    assert data["schema"] == "kmsclient.simulate/1" and data["mode"] == "in-process"
    assert data["groups"][1]["first_activated"]["at"] == "2d 09:30"
    assert any(e["event"] == "activated" and e["client"] == "win-01" for e in data["events"])
    assert svg.read_text().startswith("<svg") and "Licensed clients" in svg.read_text()
    out = io.StringIO()
    assert kmsclient_main(["simulate", path], out) == 0
    text = out.getvalue()
    assert "win25      Windows 10/11 Enterprise" in text and "2d 09:30" in text


def test_cli_simulate_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[groups]]\nproduct = "Windows 99"\n')
    assert kmsclient_main(["simulate", str(bad)]) == 2
    assert "groups[0].product: unknown product 'Windows 99'" in capsys.readouterr().err
    path = str(SCENARIOS / "seed-threshold.toml")
    assert kmsclient_main(["simulate", path, "--kmsd", "kms=127.0.0.1:1"]) == 2
    assert "--clock-file" in capsys.readouterr().err
    assert kmsclient_main(["simulate", path, "--kmsd", "other=127.0.0.1:1"]) == 2
    assert "missing kms" in capsys.readouterr().err
    assert kmsclient_main(["simulate", path, "--kmsd", "kms=192.0.2.1", "--clock-file", "x"]) == 2
    assert "loopback" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"days": "forever"}, "days: 'forever' is not a duration"),
        ({"hosts": []}, "hosts: expected at least one"),
        ({"hosts": [{"name": "a"}, {"name": "a"}]}, "names must be unique"),
        ({"groups": [{"product": "Windows 10/11 Enterprise", "hosts": ["x"]}]}, "no host named"),
        ({"groups": [{"product": "Windows 10/11 Enterprise", "count": 2, "leaving": 3}]}, "<="),
        ({"hosts": [{"name": "a", "outages": [{"from": "2d", "until": "1d"}]}]}, "after from"),
        ({"groups": [{"product": "Windows 10/11 Enterprise", "colour": 1}]}, "unknown key"),
    ],
)
def test_scenario_errors_name_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        from_dict(data)


def test_durations() -> None:
    assert parse_duration("2d 9h 30m") == 2 * DAY + 9.5 * HOUR
    assert parse_duration(1.5) == 1.5 * DAY
    assert parse_duration("90m") == 1.5 * HOUR
    # words, nothing, no number, a bool, negative, not finite, digits of another script
    for bad in ("2 days", "", "h", True, -1, float("nan"), float("inf"), "\u0663d", "1\uff10m"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_every_shipped_scenario_loads_and_charts() -> None:
    for path in sorted(SCENARIOS.glob("*.toml")):
        scenario = load(path)
        assert scenario.clients > 0, path
    tl = Timeline(scenario, "x", DAY, [], [], {}, None)
    assert chart.to_svg(tl).startswith("<svg")


def test_kmsd_clock_file_keeps_the_last_time_read(tmp_path: Path) -> None:
    path = tmp_path / "clock"
    with pytest.raises(OSError, match="clock file"):
        FileClock(path)
    write_clock(path, 1_700_000_000.5)
    clock = FileClock(path)
    assert clock() == 1_700_000_000.5
    write_clock(path, 1_800_000_000.0)
    assert clock() == 1_800_000_000.0
    path.unlink()
    assert clock() == 1_800_000_000.0


def closed_port() -> tuple[socket.socket, int]:
    """A loopback port where nothing listens (bound, never listening: connections are refused
    for as long as the socket is held)."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    return held, held.getsockname()[1]


@pytest.mark.system
def test_cli_simulate_against_a_closed_port_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    held, port = closed_port()
    with held:
        path = str(SCENARIOS / "seed-threshold.toml")
        clock = str(tmp_path / "clock")
        argv = ["simulate", path, "--kmsd", f"kms=127.0.0.1:{port}", "--clock-file", clock]
        assert kmsclient_main(argv, io.StringIO()) == 5
    err = capsys.readouterr().err
    assert err.strip() == (
        f"kmsclient simulate: error: --kmsd kms=127.0.0.1:{port}: "
        "connection refused: nothing listens there"
    )


@pytest.mark.system
async def test_loopback_counts_daemons_that_do_not_answer(tmp_path: Path) -> None:
    held, port = closed_port()
    with held:
        group = {"name": "w", "product": "Windows 11 Pro", "count": 2}
        scenario = from_dict({"days": 1, "groups": [group]})
        transport = Loopback({"kms": Target("127.0.0.1", port)}, tmp_path / "clock")
        result = await simulate(scenario, transport, keep_events=False)
    assert result is not None and len(transport.unreachable) >= 2
    assert transport.unreachable[0].startswith(f"kms (127.0.0.1:{port}): connection refused")
