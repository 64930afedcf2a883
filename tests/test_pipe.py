"""A command whose reader went away ends quietly, with the status a shell expects."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kmsd.pipe import SIGPIPE_EXIT
from kmsd.store import SqliteStore
from tests.conftest import table_settings


def run_into_closed_pipe(argv: list[str]) -> subprocess.CompletedProcess[str]:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write
    try:
        return subprocess.run(argv, stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "kmsclient", "activate", "--list-products"],
        ["-m", "kmsd", "check-config"],
    ],
    ids=["kmsclient", "kmsd"],
)
def test_a_closed_pipe_ends_the_command_quietly(argv: list[str]) -> None:
    done = run_into_closed_pipe([sys.executable, *argv])
    assert done.returncode == SIGPIPE_EXIT, done.stderr
    assert done.stderr == ""


def test_an_admin_listing_into_a_closed_pipe(tmp_path: Path) -> None:
    db = str(tmp_path / "kmsd.db")
    asyncio.run(SqliteStore(table_settings(db)).close())  # an empty database
    done = run_into_closed_pipe([sys.executable, "-m", "kmsd", "stats", "--db", db])
    assert (done.returncode, done.stderr) == (SIGPIPE_EXIT, "")
