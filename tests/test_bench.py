"""Smoke run of the benchmark, so bench/ never rots (no timing thresholds here)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "activations.py"


def test_quick_benchmark_runs_every_cell_without_errors() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--no-perf", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    (server,) = report["servers"]
    cells = {(c["version"], c["mode"]): c for c in server["cells"]}
    assert set(cells) == {(v, m) for v in (4, 5, 6) for m in ("keep", "new")}
    for cell in cells.values():
        assert cell["activations"] > 0 and cell["errors"] == {}
        assert cell["verified"] > 0 and cell["cpu_us"] > 0 and cell["peak_rss_kib"] > 0


def test_the_floor_server_answers_genuine_replies() -> None:
    """bench/floor.py (the loop's and kernel's cost alone) must stay a server whose
    replayed replies the benchmark verifies."""
    floor = f"{sys.executable} {BENCH.parent / 'floor.py'} {{port}}"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--no-perf", "--json", "--server-cmd", floor],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (server,) = json.loads(result.stdout)["servers"]
    assert len(server["cells"]) == 6
    for cell in server["cells"]:
        assert cell["activations"] > 0 and cell["errors"] == {} and cell["verified"] > 0


def test_median_round_is_chosen_per_cell() -> None:
    sys.path.insert(0, str(BENCH.parent.parent))
    from bench.activations import Cell, median_cells

    def cell(mode: str, cpu: float | None) -> Cell:
        return Cell(
            version=6,
            mode=mode,
            activations=1,
            attempts=1,
            seconds=1.0,
            rate=1.0,
            cpu_us=cpu,
            proc_cpu_us=cpu,
            perf_cpu_us=None,
            client_cpu_us=1.0,
            machine_busy=0.5,
            machine_steal=0.0,
            p50_ms=1.0,
            p99_ms=1.0,
            peak_rss_kib=1,
            verified=1,
            errors={},
            warnings={},
        )

    rounds = [
        [cell("keep", 30.0), cell("new", 300.0)],
        [cell("keep", 10.0), cell("new", None)],  # no CPU figure: counts as the slowest
        [cell("keep", 20.0), cell("new", 100.0)],
    ]
    keep, new = median_cells(rounds)
    assert (keep.cpu_us, new.cpu_us) == (20.0, 300.0)
    assert [c.cpu_us for c in median_cells(rounds[:2])] == [10.0, 300.0]  # the lower median


def test_hostile_benchmark_runs_each_case() -> None:
    """bench/hostile.py, small: every case runs and prints its figures."""
    result = subprocess.run(
        [
            *(sys.executable, str(BENCH.parent / "hostile.py"), "--hostile", "30"),
            *("--idle", "30", "--addresses", "3", "--legit", "3", "--duration", "1"),
            *("--count", "200"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "legitimate, 30 hostile open" in out
    assert out.count("legitimate success: 3 of 3 = 100.0 %") == 2  # lockout, probes
    assert "logflood:" in out and "lines/s" in out


def test_soak_prints_rss_database_and_wal_sizes() -> None:
    """bench/soak.py, a few seconds: every sample and the summary carry the RSS, the
    database's and the WAL's sizes, and the counts agree with the client table."""
    result = subprocess.run(
        [
            *(sys.executable, str(BENCH.parent / "soak.py"), "--max-activations", "60"),
            *("--rate", "40", "--duration", "60", "--sample", "0.5"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    samples = [line for line in lines if " s  activations " in line]
    summary = [line for line in lines if line.startswith(("start: ", "end: "))]
    assert len(samples) >= 2 and len(summary) == 2
    for line in samples + summary:
        assert re.search(r"RSS +[0-9.]+ MiB .* DB +[0-9.]+ MiB  WAL +[0-9.]+ MiB$", line), line
    assert float(summary[1].split("WAL")[1].split()[0]) > 0  # the store wrote through its WAL
    assert "done: 60 activations, 0 errors" in result.stdout
    assert "DIFFERENT" not in result.stdout and "consistent" in result.stdout
