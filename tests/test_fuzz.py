"""Fuzzing: a bounded atheris smoke run of every target, and the regression corpus.

The long runs (10^6 inputs per target) are made by hand: see fuzz/README.md.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.seeds import seeds
from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parent.parent
REGRESSIONS = Path(__file__).parent / "fixtures" / "fuzz"
SMOKE_SECONDS = 5


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_smoke_run_finds_nothing(name: str, tmp_path: Path) -> None:
    corpus = tmp_path / name
    corpus.mkdir()
    for i, data in enumerate(seeds()[name]):
        (corpus / f"seed-{i}").write_bytes(data)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuzz.run",
            name,
            f"-max_total_time={SMOKE_SECONDS}",
            "-runs=200000",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_SECONDS + 60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert re.search(r"DONE|Done \d+ runs", result.stderr), result.stderr[-4000:]


def test_seeds_empty_input_and_former_crashes_end_in_a_defined_outcome() -> None:
    """Former crashes live in tests/fixtures/fuzz/<target>/ (libFuzzer's crash-* files)."""
    corpora = seeds()
    for name, target in TARGETS.items():
        assert corpora[name], f"no seeds for {name}"
        crashes = REGRESSIONS / name
        former = [p.read_bytes() for p in sorted(crashes.iterdir())] if crashes.is_dir() else []
        for data in [b"", *corpora[name], *former]:
            target(data)
