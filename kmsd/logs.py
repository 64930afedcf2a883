"""structlog set-up: a human console by default, one JSON object per line on request.

The activation line, one per request, is the hot path: `info` writes it with a renderer
specialised for a flat event of strings and integers, byte for byte what structlog's
processor chain below would write, at a small fraction of its cost.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json_string
from typing import Any, TextIO

import structlog

from .loglimit import LogLimiter
from .text import inert


def _level_methods(level: int) -> dict[str, Any]:
    filtering = structlog.make_filtering_bound_logger(level)
    return {
        name: value
        for name, value in vars(filtering).items()
        if not name.startswith("__") and callable(value)
    }


# One logger class whose level methods are swapped in place by set_level: loggers cached on
# first use are its instances, so a new level reaches them all, and a call below the level
# stays a no-op method, as fast as structlog's own filtering loggers.
_Logger: type[Any] = type("KmsdLogger", (structlog.make_filtering_bound_logger(logging.INFO),), {})
_level = logging.INFO
_level_name = "info"


def set_level(level: str) -> None:
    """Change the least important level logged, for every logger, cached or not."""
    global _level, _level_name
    _level = logging.getLevelNamesMapping()[level.upper()]
    for name, method in _level_methods(_level).items():
        setattr(_Logger, name, method)
    _level_name = level


def current_level() -> str:
    return _level_name


_time = time.time
_second: list[Any] = [-1, ""]  # the last second formatted, and its text


def _second_text(second: int) -> str:
    if second != _second[0]:
        _second[:] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    text: str = _second[1]
    return text


def _now_text() -> str:
    now = _time()
    second = int(now)
    return f"{_second_text(second)}.{int((now - second) * 1e6):06d}Z"


def timestamp(_: object, __: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """UTC ISO 8601 with microseconds, as TimeStamper(fmt="iso", utc=True) writes it, at a
    tenth of its cost (the date and time are formatted once a second)."""
    event["timestamp"] = _now_text()
    return event


def inert_values(
    _: object, __: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """For the console renderers (JSON escapes on its own): every string made inert, so that
    a workstation name with terminal escapes cannot rewrite the operator's screen. A
    traceback keeps its line breaks."""
    for key, value in event.items():
        if isinstance(value, str) and not value.isprintable():
            if key == "exception":
                event[key] = "\n".join(map(inert, value.split("\n")))
            else:
                event[key] = inert(value)
    return event


_QUOTED = frozenset(" \t=\r\n\"'")  # a string with any of these is written as its repr


def _value(value: object) -> str:
    if isinstance(value, str) and _QUOTED.isdisjoint(value):
        return value
    return repr(value)


def plain_console(_: object, __: str, event: structlog.typing.EventDict) -> str:
    """The layout of structlog's ConsoleRenderer without colours (for a file, a pipe or
    the journal), at a fifth of its cost: one line per activation is the hot path."""
    head = f"{event.pop('timestamp', '')} [{event.pop('level', ''):<9}]"
    name = str(event.pop("event", ""))
    exception = event.pop("exception", None)
    pairs = [f"{key}={_value(event[key])}" for key in sorted(event)]
    line = " ".join([head, f"{name:<30}" if pairs else name, *pairs]).rstrip(" ")
    return f"{line}\n{exception}" if exception is not None else line


limiter = LogLimiter()


def flush_suppressed() -> None:
    """Write the counts of suppressed lines now (at exit: the window may not have ended)."""
    limiter.flush()


Fields = Mapping[str, str | int]
Value = str | int
_MEMO_SIZE = 1024  # rendered values kept (workstation names, products, addresses, counts)


def _console_value(value: Value) -> str:
    """A value as inert_values and plain_console write it."""
    if type(value) is str:
        if not value.isprintable():
            value = inert(value)
        return value if _QUOTED.isdisjoint(value) else repr(value)
    return repr(value)


def _json_value(value: Value) -> str:
    return _json_string(value) if type(value) is str else json.dumps(value)


def _literal(text: str) -> str:
    return text.replace("%", "%%")


@dataclass(frozen=True, slots=True)
class _Layout:
    """A line of one event with one set of keys: the values (given in the keys' order)
    in the line's order, and the line as a %-template whose first (or, `time_last`, last)
    two fields are the time's second and microseconds."""

    order: Callable[[Sequence[Any]], Sequence[Any]]
    template: str
    time_last: bool = False


def _reorder(keys: Sequence[str], order: Sequence[str]) -> Callable[[Sequence[Any]], Any]:
    if list(keys) == list(order):
        return lambda shown: shown
    picks = [keys.index(key) for key in order]
    return operator.itemgetter(*picks) if len(picks) > 1 else lambda shown: (shown[picks[0]],)


def _console_layout(event: str, level: str, keys: tuple[str, ...]) -> _Layout:
    order = sorted(keys)
    name = event if event.isprintable() else inert(event)
    head = f"[{level:<9}] {name:<30}" if order else f"[{level:<9}] {name}".rstrip(" ")
    pairs = "".join(f" {_literal(key)}=%s" for key in order)
    return _Layout(_reorder(keys, order), "%s.%06dZ " + _literal(head) + pairs)


def _json_layout(event: str, level: str, keys: tuple[str, ...]) -> _Layout:
    pairs = "".join(f"{_literal(_json_string(key))}: %s, " for key in keys)
    tail = f'"event": {_json_string(event)}, "level": {_json_string(level)}, "timestamp": '
    return _Layout(_reorder(keys, keys), "{" + pairs + _literal(tail) + '"%s.%06dZ"}', True)


class _FlatRenderer:
    """Renders a flat event (every value a str or an int, never a bool) in one format.

    What costs is done once: per event and set of keys, their order and the line's
    template (_Layout); per distinct value (a workstation name, a product, a count), its
    rendering, kept in a bounded memo. A line is then a C-level pass over the values and
    one %-format.
    """

    def __init__(
        self, layout: Callable[[str, str, tuple[str, ...]], _Layout], value: Callable[[Any], str]
    ) -> None:
        self._make_layout = layout
        self._render_value = value
        self._layouts: dict[tuple[str, str, tuple[str, ...]], _Layout] = {}
        self._memo: dict[Value, str] = {}

    def layout(self, event: str, level: str, keys: tuple[str, ...]) -> _Layout:
        key = (event, level, keys)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = self._make_layout(event, level, keys)
        return layout

    def line(self, layout: _Layout, values: Sequence[Value]) -> str:
        memo = self._memo
        shown = list(map(memo.get, values))
        if None in shown:
            if len(memo) > _MEMO_SIZE:
                memo.clear()
            for i, value in enumerate(values):
                if shown[i] is None:
                    shown[i] = memo[value] = self._render_value(value)
        now = _time()
        second = int(now)
        stamp = _second if second == _second[0] else (second, _second_text(second))
        micro = int((now - second) * 1e6)
        if layout.time_last:
            return layout.template % (*layout.order(shown), stamp[1], micro)
        return layout.template % (stamp[1], micro, *layout.order(shown))

    def __call__(self, event: str, fields: Fields, level: str = "info") -> str:
        return self.line(self.layout(event, level, tuple(fields)), tuple(fields.values()))


console_line = _FlatRenderer(_console_layout, _console_value)
"""What inert_values and plain_console make of a flat event."""
json_line = _FlatRenderer(_json_layout, _json_value)
"""What JSONRenderer makes of a flat event."""


class LineWriter:
    """structlog's PrintLogger (one line per event, written at once), cheaper: each line
    goes out in one write() to the file's descriptor, without the text layer's buffering
    (a file without a descriptor, such as a test's capture, is written as PrintLogger
    would). A lock keeps the lines of several threads whole."""

    def __init__(self, file: TextIO) -> None:
        self._file = file
        try:
            self._fd = file.fileno()
        except (AttributeError, OSError, ValueError):
            self._fd = -1
        self._encoding = getattr(file, "encoding", None) or "utf-8"
        self._errors = getattr(file, "errors", None) or "strict"
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        line = message + "\n"
        with self._lock:
            if self._fd < 0:
                self._file.write(line)
                self._file.flush()
                return
            data = line.encode(self._encoding, self._errors)
            while data:
                data = data[os.write(self._fd, data) :]

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg
    failure = msg


# The fast renderer of the configured format (None: structlog's chain, e.g. for a terminal)
# and the writer of every log line.
_render: _FlatRenderer | None = None
_writer = LineWriter(sys.stderr)


def info(logger: Any, event: str, fields: Fields) -> None:
    """`logger.info(event, **fields)`, written by the configured fast renderer. Every value
    must be a str or an int (not a bool); no key may be event, level or timestamp."""
    if _level > logging.INFO:
        return
    if _render is None:
        logger.info(event, **fields)
    else:
        _writer.msg(_render(event, fields))


class Event:
    """An event logged often with the same keys (the activation line), bound once:
    `event(*values, **more)` is `info(logger, name, dict(zip(keys, values)) | more)`,
    without building the dict or looking the layout up each time."""

    __slots__ = ("_keys", "_layout", "_logger", "_name", "_renderer")

    def __init__(self, logger: Any, name: str, keys: Sequence[str]) -> None:
        self._logger = logger
        self._name = name
        self._keys = tuple(keys)
        self._renderer: _FlatRenderer | None = None
        self._layout: _Layout | None = None

    def __call__(self, *values: Value, **more: Value) -> None:
        renderer = _render
        if more or renderer is None or _level > logging.INFO:
            info(self._logger, self._name, dict(zip(self._keys, values, strict=True)) | more)
            return
        if renderer is not self._renderer or self._layout is None:
            self._renderer = renderer
            self._layout = renderer.layout(self._name, "info", self._keys)
        _writer.msg(renderer.line(self._layout, values))


def configure(fmt: str = "console", level: str = "info") -> None:
    global _render, _writer
    set_level(level)
    renderers: list[structlog.typing.Processor]
    if fmt == "json":
        renderers = [structlog.processors.JSONRenderer()]
        _render = json_line
    elif sys.stderr.isatty():
        renderers = [inert_values, structlog.dev.ConsoleRenderer(colors=True)]
        _render = None
    else:
        renderers = [inert_values, plain_console]
        _render = console_line
    _writer = LineWriter(sys.stderr)
    structlog.configure(
        processors=[
            # first: a suppressed line costs nothing more; it passes info lines, which
            # info() and Event write without this chain
            limiter,
            # (kmsd binds no context variables, so no merge_contextvars)
            structlog.processors.add_log_level,
            timestamp,
            structlog.processors.format_exc_info,
            *renderers,
        ],
        wrapper_class=_Logger,
        logger_factory=lambda *_: _writer,
        cache_logger_on_first_use=True,
    )
