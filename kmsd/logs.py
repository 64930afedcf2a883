"""structlog set-up: a human console by default, one JSON object per line on request."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


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


def configure(fmt: str = "console", level: str = "info") -> None:
    set_level(level)
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=_Logger,
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
