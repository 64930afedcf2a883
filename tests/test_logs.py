"""Log rendering: kmsd's plain console lines are structlog's ConsoleRenderer's, cheaper."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsd import logs
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


# The fast renderer of hot events (logs.info, logs.Event) against structlog's own chain.

ACTIVATION_KEYS = (
    "client",
    "cmid",
    "workstation",
    "application",
    "product",
    "protocol",
    "ndr",
    "count",
    "required",
)
ACTIVATION = (
    "127.0.0.1:50123",
    "0d7c3f6e-3a51-4a9a-9b8c-0a1b2c3d4e5f",
    "pc-01.lab.test",
    "Windows",
    "Windows 10/11 Enterprise",
    "6.0",
    "NDR64",
    3,
    25,
)
HOSTILE = "pc\x1b[1A\x1b[2K\x9b31m\u202egpj.exe\u2066x\x7f\u2028y"
FIXED_CASES = [
    ("activation", dict(zip(ACTIVATION_KEYS, ACTIVATION, strict=True))),
    (
        "activation",
        {
            **dict(zip(ACTIVATION_KEYS, ACTIVATION, strict=True)),
            "workstation": HOSTILE,
            "kms_id": "unknown 8a4b2f0e-0000-0000-0000-000000000000",
            "below_threshold": "count 3 of 25: not activated yet; a small lab can start ...",
        },
    ),
    ("activation", {"workstation": "Ünïcødé 'quoted' \"x\" %s {0} a=b\ttab", "count": -1}),
    ("listening", {"address": "[::1]:1688", "inherited": 0}),
    ("no fields at all  ", {}),
    ("%s {} \x1b odd event", {"z": "%d", "a": "{t}"}),
]


NOW = 1_764_640_000_123_456_789  # ns since the epoch


def _lines(
    fmt: str,
    emit: Callable[[Any], None],
    monkeypatch: pytest.MonkeyPatch,
    clock: Callable[[], int] = lambda: NOW,
) -> list[str]:
    """What `emit(logger)` writes with kmsd's logging configured as `fmt` to a file (not a
    terminal), at the times `clock` gives."""
    # left open: loggers cached on first use keep writing to it after the test
    out = tempfile.TemporaryFile("w+", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
    _KEPT.append(out)
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.setattr(logs, "_clock", clock)
    logs.configure(fmt, "info")
    emit(structlog.get_logger("test"))
    out.seek(0)
    return out.read().splitlines()


_KEPT: list[Any] = []


def _assert_fast_is_structlog(
    fmt: str, event: str, fields: dict[str, str | int], monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = _lines(fmt, lambda log: log.info(event, **fields), monkeypatch)
    fast = _lines(fmt, lambda log: logs.info(log, event, fields), monkeypatch)
    bound = logs.Event(None, event, tuple(fields)).emit
    prebound = _lines(fmt, lambda log: bound(*fields.values()), monkeypatch)
    assert fast == reference and prebound == reference and len(reference) == 1


@pytest.mark.parametrize("fmt", ["console", "json"])
@pytest.mark.parametrize(("event", "fields"), FIXED_CASES)
def test_fast_lines_are_byte_for_byte_structlog_lines(
    fmt: str, event: str, fields: dict[str, str | int], monkeypatch: pytest.MonkeyPatch
) -> None:
    _assert_fast_is_structlog(fmt, event, fields, monkeypatch)


def test_a_file_without_a_descriptor_gets_the_same_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test's capture (no fileno): written through the text layer, the same lines."""
    bound = logs.Event(None, "activation", ACTIVATION_KEYS)
    for fmt in ("console", "json"):
        expected = _lines(fmt, lambda log: bound.emit(*ACTIVATION), monkeypatch)
        out = io.StringIO()
        monkeypatch.setattr(sys, "stderr", out)
        logs.configure(fmt, "info")
        bound.emit(*ACTIVATION)
        assert out.getvalue().splitlines() == expected


def test_hostile_workstation_is_inert_in_the_console_line(monkeypatch: pytest.MonkeyPatch) -> None:
    bound = logs.Event(None, "activation", ACTIVATION_KEYS).emit
    values = (*ACTIVATION[:2], HOSTILE, *ACTIVATION[3:])
    (line,) = _lines("console", lambda log: bound(*values), monkeypatch)
    assert "workstation=pc\\x1b[1A\\x1b[2K\\x9b31m\\u202egpj.exe\\u2066x\\x7f\\u2028y" in line
    assert line.isprintable()
    (line,) = _lines("json", lambda log: bound(*values), monkeypatch)
    assert json.loads(line)["workstation"] == HOSTILE  # JSON keeps it exact


OPTIONAL = ("kms_id", "below_threshold", "rule")


def test_optional_keys_follow_in_their_order_when_given(monkeypatch: pytest.MonkeyPatch) -> None:
    bound = logs.Event(None, "activation", ACTIVATION_KEYS, OPTIONAL).emit
    (line,) = _lines("json", lambda log: bound(*ACTIVATION, "unknown x", None, "r"), monkeypatch)
    keys = [*ACTIVATION_KEYS, "kms_id", "rule", "event", "level", "timestamp"]
    assert list(json.loads(line)) == keys


def _same_text(text: str) -> str:
    """An equal str that is another object (as a request's version string is each time)."""
    return "".join(list(text))


# One event logged line after line: values that repeat (the same object or an equal one),
# change, change type ("3" after 3), come back; optional keys come and go; hostile text.
SEQUENCE = [
    (*ACTIVATION, None, None, None),
    (*ACTIVATION, None, None, None),
    (*map(_same_text, ACTIVATION[:7]), 3, 25, None, None, None),
    ("[::1]:50124", *ACTIVATION[1:], "unknown 8a4b", None, "lab rule"),
    (ACTIVATION[0], ACTIVATION[1], HOSTILE, *ACTIVATION[3:7], "3", 25, None, "count 3 of 25", None),
    (ACTIVATION[0], ACTIVATION[1], HOSTILE, *ACTIVATION[3:7], 3, 25, None, "count 3 of 25", None),
    (*ACTIVATION[:4], "Office LTSC 2021", *ACTIVATION[5:], None, None, "lab rule"),
    (*ACTIVATION, "", " ", "="),
    (*ACTIVATION, None, None, None),
]
# ns: within a second, the next second, the clock stepped back, and forward again
TIMES = [NOW, NOW + 1_000, NOW + 876_543_210, NOW + 877_000_000, NOW - 5 * 10**9, NOW, NOW]


# How an Event may be told which keys change on every line and which are plain: none, the
# server's own, every key varying.
BINDINGS: list[dict[str, tuple[str, ...]]] = [
    {},
    {"varying": ("client", "cmid", "workstation"), "plain": ("client", "cmid")},
    {"varying": (*ACTIVATION_KEYS, *OPTIONAL)},
]


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize("fmt", ["console", "json"])
def test_a_bound_event_line_after_line_is_structlog_line_after_line(
    fmt: str, binding: dict[str, tuple[str, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = (*ACTIVATION_KEYS, *OPTIONAL)

    def reference(log: Any) -> None:
        for values in SEQUENCE:
            log.info(
                "activation", **{k: v for k, v in zip(keys, values, strict=True) if v is not None}
            )

    def clock() -> Callable[[], int]:
        return iter(TIMES + [NOW + i for i in range(len(SEQUENCE))]).__next__

    bound = logs.Event(None, "activation", ACTIVATION_KEYS, OPTIONAL, **binding)
    expected = _lines(fmt, reference, monkeypatch, clock())

    def fast(log: Any) -> None:
        for values in SEQUENCE:
            bound.emit(*values)

    assert _lines(fmt, fast, monkeypatch, clock()) == expected
    assert len(expected) == len(SEQUENCE)


def test_the_servers_activation_event_is_bound_as_the_test_above() -> None:
    from kmsd.server import _activation

    assert _activation.keys == (*ACTIVATION_KEYS, *OPTIONAL)
    keys = _activation.keys
    assert tuple(keys[i] for i in sorted(_activation.varying)) == BINDINGS[1]["varying"]
    assert tuple(keys[i] for i in sorted(_activation.plain)) == BINDINGS[1]["plain"]


def test_varying_and_plain_keys_must_be_keys() -> None:
    with pytest.raises(ValueError, match="among the keys"):
        logs.Event(None, "activation", ACTIVATION_KEYS, plain=("cmd",))
    with pytest.raises(ValueError, match="among the keys"):
        logs.Event(None, "activation", ACTIVATION_KEYS, varying=("kms_id",))


PLAIN_CASES = [
    ("127.0.0.1:50123", True),
    ("[fe80::1%eth0]:50123", True),
    ("0d7c3f6e-3a51-4a9a-9b8c-0a1b2c3d4e5f", True),
    ("", True),
    ("a b", False),
    ("a=b", False),
    ('a"b', False),
    ("a'b", False),
    ("a\\b", False),
    ("pc\x1b[2K", False),
    ("caf\u00e9", False),
    ("\u202e", False),
]


@pytest.mark.parametrize(("text", "expected"), PLAIN_CASES)
def test_plain_text_is_what_both_formats_write_as_it_is(text: str, expected: bool) -> None:
    assert logs.is_plain(text) is expected
    assert logs.is_plain(logs.plain(text))
    assert (logs.plain(text) == text) is expected


@settings(max_examples=300, derandomize=True)
@given(text=texts)
def test_plain_text_needs_no_quoting_or_escaping(text: str) -> None:
    made = logs.plain(text)
    assert len(made) == len(text) and logs.is_plain(made)
    if logs.is_plain(text):
        assert made == text
        assert logs._console_value(text) == text
        assert json.dumps(text) == f'"{text}"'


def test_a_scoped_peer_is_named_in_plain_text() -> None:
    from kmsd.server import peer_text

    assert peer_text("127.0.0.1", 50123) == "127.0.0.1:50123"
    assert peer_text("::1", 50123) == "[::1]:50123"
    assert peer_text("fe80::1%eth0", 1688) == "[fe80::1%eth0]:1688"
    assert peer_text('fe80::1%e"x=\x1b', 1688) == "[fe80::1%e?x??]:1688"


def test_below_the_level_nothing_is_written(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    logs.configure("console", "warning")
    assert not logs.info_enabled
    logs.Event(None, "activation", ACTIVATION_KEYS).emit(*ACTIVATION)
    logs.info(None, "activation", {"count": 1})
    assert out.getvalue() == ""
    logs.configure("console", "info")


flat_keys = st.text("abcdefghijklmnopqrstuvwxyz_%{}", min_size=1, max_size=10).filter(
    lambda k: k not in ("timestamp", "level", "event")
)
flat_values = st.one_of(texts, st.integers(), st.sampled_from([HOSTILE, "a b", "%s", "{0}"]))


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    fmt=st.sampled_from(["console", "json"]),
    event=texts,
    fields=st.dictionaries(flat_keys, flat_values, max_size=8),
)
def test_fast_lines_match_structlog_for_any_flat_event(
    fmt: str, event: str, fields: dict[str, str | int]
) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        _assert_fast_is_structlog(fmt, event, fields, monkeypatch)


def test_line_writer_writes_whole_lines_to_a_descriptor() -> None:
    read, write = os.pipe()
    with os.fdopen(write, "w") as file:
        writer = logs.LineWriter(file)
        writer.msg("first ü")
        writer.info("second")
    with os.fdopen(read, "rb") as pipe:
        assert pipe.read() == "first ü\nsecond\n".encode()
