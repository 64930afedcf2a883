"""structlog set-up: a human console by default, one JSON object per line on request."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

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
_level = "info"


def set_level(level: str) -> None:
    """Change the least important level logged, for every logger, cached or not."""
    global _level
    for name, method in _level_methods(logging.getLevelNamesMapping()[level.upper()]).items():
        setattr(_Logger, name, method)
    _level = level


def current_level() -> str:
    return _level


_second = -1
_second_text = ""


def timestamp(_: object, __: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """UTC ISO 8601 with microseconds, as TimeStamper(fmt="iso", utc=True) writes it, at a
    tenth of its cost (the date and time are formatted once a second)."""
    global _second, _second_text
    now = time.time()
    second = int(now)
    if second != _second:
        _second, _second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    event["timestamp"] = f"{_second_text}.{int((now - second) * 1e6):06d}Z"
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


def configure(fmt: str = "console", level: str = "info") -> None:
    set_level(level)
    renderers: list[structlog.typing.Processor]
    if fmt == "json":
        renderers = [structlog.processors.JSONRenderer()]
    elif sys.stderr.isatty():
        renderers = [inert_values, structlog.dev.ConsoleRenderer(colors=True)]
    else:
        renderers = [inert_values, plain_console]
    structlog.configure(
        processors=[
            limiter,  # first: a suppressed line costs nothing more
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamp,
            structlog.processors.format_exc_info,
            *renderers,
        ],
        wrapper_class=_Logger,
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
