"""Log rendering: kmsd's plain console lines are structlog's ConsoleRenderer's, cheaper."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time

import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsd.logs import plain_console, timestamp

# Text rich in the characters that decide between a bare value and its repr.
texts = st.text(st.sampled_from(" \t=\r\n\"'aZ:/.\\ü\x0c") | st.characters(), max_size=20)
values = st.one_of(
    texts,
    st.integers(),
    st.floats(allow_nan=False),
    st.none(),
    st.booleans(),
    st.binary(max_size=4),
    st.lists(st.integers(), max_size=3),
)
events = st.fixed_dictionaries(
    {
        "timestamp": st.just("2026-11-29T02:55:38.287292Z"),
        "level": st.sampled_from(["debug", "info", "warning", "error"]),
        "event": texts | st.integers() | st.dictionaries(st.text(max_size=3), st.integers()),
    },
    optional={"exception": texts},
).flatmap(
    lambda head: st.dictionaries(
        st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).filter(
            lambda k: k not in ("timestamp", "level", "event", "exception", "stack", "exc_info")
        ),
        values,
        max_size=5,
    ).map(lambda rest: {**head, **rest})
)


@settings(max_examples=500)
@given(event=events)
def test_plain_console_writes_what_console_renderer_writes(event: dict[str, object]) -> None:
    reference = structlog.dev.ConsoleRenderer(colors=False)
    assert plain_console(None, "info", dict(event)) == reference(None, "info", dict(event))


def test_timestamp_is_utc_iso_with_microseconds() -> None:
    before = time.time()
    stamp = timestamp(None, "info", {})["timestamp"]
    after = time.time()
    assert stamp.endswith("Z") and len(stamp) == len("2026-11-29T02:55:38.287292Z")
    moment = dt.datetime.fromisoformat(stamp[:-1]).replace(tzinfo=dt.UTC).timestamp()
    assert before - 1e-6 <= moment <= after + 1e-6


def test_daemon_lines_on_a_pipe_are_plain_console_lines() -> None:
    """Not a terminal: the plain renderer, one line per event, no colour codes."""
    code = (
        "import structlog; from kmsd import logs; logs.configure('console', 'info');"
        "structlog.get_logger('kmsd').info('activation', count=3, product='Windows 11 Pro')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = out.stderr.strip()
    assert "\x1b[" not in line
    expected = "[info     ] activation                     count=3 product='Windows 11 Pro'"
    assert line.endswith(expected)
