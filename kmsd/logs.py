"""structlog set-up: a human console by default, one JSON object per line on request.

The activation line, one per request, is the hot path: `info` writes it with a renderer
specialised for a flat event of strings and integers, byte for byte what structlog's
processor chain below would write, at a small fraction of its cost.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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
info_enabled = True
"""Whether info lines are written (the level is info or debug): a test cheaper than a call."""
debug_enabled = False
"""Whether debug lines are written."""


def set_level(level: str) -> None:
    """Change the least important level logged, for every logger, cached or not."""
    global _level, _level_name, _generation, info_enabled, debug_enabled
    _generation = object()
    _level = logging.getLevelNamesMapping()[level.upper()]
    info_enabled = _level <= logging.INFO
    debug_enabled = _level <= logging.DEBUG
    for name, method in _level_methods(_level).items():
        setattr(_Logger, name, method)
    _level_name = level


def current_level() -> str:
    return _level_name


_clock = time.time_ns
_second: list[Any] = [-1, ""]  # the last second formatted, and its text


def _second_text(second: int) -> str:
    """The date and time of `second` since the epoch, "2026-11-29T02:55:38"."""
    if second != _second[0]:
        _second[:] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    text: str = _second[1]
    return text


def _now_text() -> str:
    second, micro = divmod(_clock() // 1000, 1_000_000)
    return f"{_second_text(second)}.{micro:06d}Z"


def timestamp(_: object, __: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """UTC ISO 8601 with microseconds, as TimeStamper(fmt="iso", utc=True) writes it, at a
    tenth of its cost (the date and time are formatted once a second). The microseconds
    are datetime.now()'s: the system clock's nanoseconds, floored."""
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


def _console_value(value: object) -> str:
    """A value as inert_values and plain_console write it."""
    if type(value) is str:
        if not value.isprintable():
            value = inert(value)
        return value if _QUOTED.isdisjoint(value) else repr(value)
    return repr(value)


def _json_value(value: object) -> str:
    """A value as JSONRenderer writes it."""
    return json.dumps(value)


# A line is laid out as a plan of literal text (str), the time (None: the date, the time
# and a dot; then the microseconds), and fields: the index of a value among the keys and
# the text written before it (" key=", '"key": ').
Plan = list[str | tuple[int, str] | None]


def _console_plan(event: str, level: str, keys: tuple[str, ...]) -> Plan:
    order = sorted(keys)
    name = event if event.isprintable() else inert(event)
    head = f"[{level:<9}] {name:<30}" if order else f"[{level:<9}] {name}".rstrip(" ")
    return [None, f"Z {head}", *[(keys.index(key), f" {key}=") for key in order], "\n"]


def _json_plan(event: str, level: str, keys: tuple[str, ...]) -> Plan:
    tail = f'"event": {_json_string(event)}, "level": {_json_string(level)}, "timestamp": "'
    fields = [(index, f"{_json_string(key)}: ") for index, key in enumerate(keys)]
    return ["{", *fields, tail, None, 'Z"}\n']


# How each format writes a value {v} in generated code: the usual values (a str with nothing
# to escape or quote, an int) inline, others by the function; what follows each field; and
# what surrounds a plain value (a str kmsd made, with nothing to escape or quote).
_CONSOLE_VALUE = (
    "({v} if type({v}) is str and {v}.isprintable() and ' ' not in {v} and '=' not in {v}"
    """ and '"' not in {v} and "'" not in {v} else repr({v}) if type({v}) is int else"""
    " _console_value({v}))"
)
_JSON_VALUE = (
    "(_json_string({v}) if type({v}) is str else repr({v}) if type({v}) is int"
    " else _json_value({v}))"
)
_MISSING = object()
_DIGITS = tuple(f"{n:03d}" for n in range(1000))
_SECOND = 1_000_000_000  # ns


def is_plain(text: str) -> bool:
    """Whether `text` is written as it is in both formats (printable ASCII, nothing that
    the console quotes or JSON escapes): what a value of an Event's `plain` keys must be."""
    return text.isascii() and text.isprintable() and _UNPLAIN.isdisjoint(text)


_UNPLAIN = frozenset(" =\"'\\")


def plain(text: str) -> str:
    """`text` with each character that `is_plain` refuses written "?"."""
    return text if is_plain(text) else "".join(c if is_plain(c) else "?" for c in text)


class LineWriter:
    """structlog's PrintLogger (one line per event, written at once), cheaper: each line
    goes out in one write() to the file's descriptor, without the text layer's buffering
    (a file without a descriptor, such as a test's capture, is written as PrintLogger
    would). A lock keeps the lines of several threads whole."""

    def __init__(self, file: TextIO) -> None:
        self.file = file
        try:
            self.fd = file.fileno()
        except (AttributeError, OSError, ValueError):
            self.fd = -1
        self.encoding = getattr(file, "encoding", None) or "utf-8"
        self.errors = getattr(file, "errors", None) or "strict"
        self.lock = threading.Lock()

    def write(self, line: str) -> None:
        """Write `line`, which ends with its line break."""
        with self.lock:
            if self.fd < 0:
                self.file.write(line)
                self.file.flush()
                return
            _write_all(self.fd, line.encode(self.encoding, self.errors))

    def msg(self, message: str) -> None:
        self.write(message + "\n")

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg
    failure = msg


class _FlatRenderer:
    """Renders a flat event (every value a str or an int, never a bool) in one format.

    For each event and set of keys it generates the code of the line, as namedtuple and
    dataclasses generate theirs: the literal text in place, each value written inline in
    the usual cases, one f-string. Only names made here appear in that source; keys,
    events and values are data (literals as their repr, values as arguments).

    An emitter (the code of an Event) also keeps the last values of the keys that repeat
    from line to line (products, counts, versions) and their fields, and the date and time
    to the second, and writes the line itself, under the writer's lock.
    """

    def __init__(
        self,
        plan: Callable[[str, str, tuple[str, ...]], Plan],
        value: str,
        after: str,
        plain: tuple[str, str],
    ) -> None:
        self._plan = plan
        self._value = value  # the expression of the text of {v}
        self._after = after  # the text after each field
        self._plain = plain  # the text before and after a plain value
        self._lines: dict[tuple[str, str, tuple[str, ...]], Callable[..., str]] = {}

    def __call__(self, event: str, fields: Fields, level: str = "info") -> str:
        """The line of `event` with `fields`, with its line break."""
        key = (event, level, tuple(fields))
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = self._line(self._plan(*key))
        return line(*fields.values())

    def _fields(
        self,
        plan: Plan,
        optional: int = 0,
        kept: frozenset[int] = frozenset(),
        plain: frozenset[int] = frozenset(),
    ) -> tuple[list[str], list[str], str]:
        """The code of a line from the values v0, v1...: the statements that make the
        fields r0, r1... of the values that change from line to line; those that make the
        fields of the values that may repeat (the indexes `kept`: remade only when their
        value changed since the last line, kept in l0, l1...); and the f-string of the line.
        A value among the last `optional` may be None, which leaves its field out; one of
        the indexes `plain` is written as it is."""
        count = sum(type(part) is tuple for part in plan)
        fresh: list[str] = []
        again: list[str] = []
        text: list[str] = []
        for part in plan:
            if part is None:
                text.append('f"{second}{_DIGITS[ns // 1000000]}{_DIGITS[ns // 1000 % 1000]}"')
                continue
            if type(part) is str:
                text.append(repr(part))
                continue
            assert isinstance(part, tuple)
            index, label = part
            v = f"v{index}"
            value = self._value.format(v=v)
            if index >= count - optional:  # the label and what follows go with the value
                if index in plain:
                    value = _joined(self._plain[0], v, self._plain[1])
                field = f'"" if {v} is None else ' + _joined(label, value, self._after)
                text.append(f'f"{{r{index}}}"')
            elif index in plain:
                before, after = self._plain
                text += [repr(label + before), f'f"{{{v}}}"', repr(after + self._after)]
                continue
            else:
                field = value
                text += [repr(label), f'f"{{r{index}}}"', repr(self._after)]
            if index not in kept:
                fresh.append(f"r{index} = {field}")
                continue
            again += [
                f"if {v} is not l{index}:",
                f"    if {v} != l{index} or type({v}) is not type(l{index}):",
                f"        r{index} = {field}",
                f"    l{index} = {v}",
            ]
        return fresh, again, " ".join(text)

    def _line(self, plan: Plan) -> Callable[..., str]:
        code, _, text = self._fields(plan)
        count = sum(type(part) is tuple for part in plan)
        source = [
            "def make():",
            f"    def line({_parameters(count)}):",
            "        seconds, ns = divmod(_clock(), _SECOND)",
            '        second = _second_text(seconds) + "."',
            *(f"        {line}" for line in code),
            f"        return {text}",
            "    return line",
        ]
        return _generated(source)()  # type: ignore[no-any-return]

    def emitter(self, event_: Event, writer: LineWriter) -> Callable[..., None]:
        """The code of `event_`: write its info line to `writer`, as long as the
        configuration stays; after a change, `event_` takes the call and makes new code."""
        keys = event_.keys
        plan = self._plan(event_.name, "info", keys)
        count = len(keys)
        kept = frozenset(range(count)) - event_.varying - event_.plain
        fresh, again, text = self._fields(plan, event_.optional, kept, event_.plain)
        names = [f"v{index}" for index in sorted(kept)]
        state = ["base", "second", "last", *(f"{n}{i}" for n in "lr" for i in sorted(kept))]
        slow = "data = line.encode(encoding, errors)"
        encode = [slow]
        if codecs.lookup(writer.encoding).name == "utf-8":  # the same bytes, or an error
            encode = ["try:", "    data = line.encode()", "except ValueError:", f"    {slow}"]
        write = ["out.write(line)", "out.flush()"]
        if writer.fd >= 0:
            write = [*encode, "sent = write(fd, data)", "if sent != len(data):"]
            write.append("    _write_all(fd, data[sent:])")  # (seldom: a pipe nearly full)
        source = [
            "def make(event, generation, acquire, release, write, fd, encoding, errors, out):",
            "    base = -2 * _SECOND  # the first ns of the second in `second`",
            '    second = ""',
            "    last = None  # the last values of the kept fields",
            *(f"    l{index} = _MISSING" for index in sorted(kept)),
            *(f'    r{index} = ""' for index in sorted(kept)),
            f"    def emit({_parameters(count)}):",
            f"        nonlocal {', '.join(state)}",
            "        if _generation is not generation:",
            f"            return event.changed({', '.join(f'v{index}' for index in range(count))})",
            *(f"        {line}" for line in fresh),
            "        acquire()",
            "        try:",
            "            ns = _clock() - base",
            "            if not 0 <= ns < _SECOND:",
            "                ns += base",
            "                base = ns - ns % _SECOND",
            '                second = _second_text(base // _SECOND) + "."',
            "                ns -= base",
            *(
                [
                    f"            values = ({', '.join(names)},)",
                    "            if values != last:",
                    "                last = values",
                    *(f"                {line}" for line in again),
                ]
                if kept
                else []
            ),
            f"            line = {text}",
            *(f"            {line}" for line in write),
            "        finally:",
            "            release()",
            "    return emit",
        ]
        lock = writer.lock
        return _generated(source)(  # type: ignore[no-any-return]
            event_,
            _generation,
            lock.acquire,
            lock.release,
            os.write,
            writer.fd,
            writer.encoding,
            writer.errors,
            writer.file,
        )


def _joined(before: str, value: str, after: str) -> str:
    """The expression of literal `before`, the expression `value`, literal `after`."""
    parts = [repr(before)] if before else []
    parts.append(value)
    if after:
        parts.append(repr(after))
    return " + ".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    """Write `data` whole (a write() to a pipe nearly full takes only part of it)."""
    while data:
        data = data[os.write(fd, data) :]


def _parameters(count: int) -> str:
    return ", ".join([*(f"v{index}" for index in range(count)), "/"]) if count else ""


def _generated(source: list[str]) -> Callable[..., Any]:
    """The function `make` of `source`, with this module's globals."""
    made: dict[str, Any] = {}
    exec("\n".join(source), globals(), made)  # no text from outside in it
    return made["make"]  # type: ignore[no-any-return]


console_line = _FlatRenderer(_console_plan, _CONSOLE_VALUE, "", ("", ""))
"""What inert_values and plain_console make of a flat event (with the line break)."""
json_line = _FlatRenderer(_json_plan, _JSON_VALUE, ", ", ('"', '"'))
"""What JSONRenderer makes of a flat event (with the line break)."""

# The fast renderer of the configured format (None: structlog's chain, e.g. for a terminal),
# the writer of every log line, and a token that configure() and set_level() replace.
_render: _FlatRenderer | None = None
_writer = LineWriter(sys.stderr)
_generation = object()


def info(logger: Any, event: str, fields: Fields) -> None:
    """`logger.info(event, **fields)`, written by the configured fast renderer. Every value
    must be a str or an int (not a bool); no key may be event, level or timestamp."""
    if _level > logging.INFO:
        return
    if _render is None:
        logger.info(event, **fields)
    else:
        _writer.write(_render(event, fields))


class Event:
    """An info event logged often with the same keys (the activation line), bound once:
    `event.emit(*values)` is `info(logger, name, fields)` with the fields of `keys` and
    `optional` (in that order) whose values are not None, in code generated for the
    configured format. Values are str or int (not bool), and equal values of one type
    render alike (the last values of the keys that repeat, and their text, are kept).

    `varying`: keys whose value is new on most lines (not worth keeping); `plain`: keys
    whose value kmsd makes itself and `is_plain` (a GUID's text, an address and port),
    written as they are, without a look at each character."""

    __slots__ = ("_logger", "emit", "keys", "name", "optional", "plain", "varying")

    def __init__(
        self,
        logger: Any,
        name: str,
        keys: Sequence[str],
        optional: Sequence[str] = (),
        *,
        varying: Sequence[str] = (),
        plain: Sequence[str] = (),
    ) -> None:
        every = (*keys, *optional)
        if len(set(every)) != len(every) or (optional and not keys):
            # (with every field left out, the console line would be laid out otherwise)
            raise ValueError(f"keys must be distinct, and one at least not optional: {every}")
        if not {*varying, *plain} <= set(every):
            raise ValueError(f"varying and plain keys must be among the keys: {every}")
        self._logger = logger
        self.name = name
        self.keys = every
        self.optional = len(optional)
        self.varying = frozenset(map(every.index, varying))
        self.plain = frozenset(map(every.index, plain))
        self.emit: Callable[..., None] = self.changed

    def changed(self, *values: Value | None) -> None:
        """The first call after the configuration changed: new code for it, then the call."""
        renderer = _render
        if renderer is None or _level > logging.INFO:
            fields = dict(zip(self.keys, values, strict=True))
            for key in self.keys[len(self.keys) - self.optional :]:
                if fields[key] is None:
                    del fields[key]
            info(self._logger, self.name, fields)  # type: ignore[arg-type]
            return
        self.emit = renderer.emitter(self, _writer)
        self.emit(*values)


def configure(fmt: str = "console", level: str = "info") -> None:
    global _render, _writer, _generation
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
    _generation = object()
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
