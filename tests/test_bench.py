"""Smoke run of the benchmark, so bench/ never rots (no timing thresholds here)."""

from __future__ import annotations

import json
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
