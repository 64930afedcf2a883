"""A group commit as the replies waiting for it see it (kmsd.store makes them)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from typing import Any

import structlog

log = structlog.get_logger("kmsd.store")


class Commit:
    """One group commit, as the replies waiting for it see it: done once its records are
    committed (and flushed, with synchronous "full"), or failed with `exception()`.

    Unlike an asyncio.Future, it runs its callbacks at once when it settles, so that
    replies leave in the same turn of the loop as the commit; it can also be awaited.
    `settled` and `error` are done() and exception() as attributes, for the reply path
    (read them, never set them)."""

    __slots__ = ("_callbacks", "error", "settled")

    def __init__(self) -> None:
        self._callbacks: list[Callable[[Commit], object]] = []
        self.settled = False
        self.error: BaseException | None = None

    def done(self) -> bool:
        return self.settled

    def exception(self) -> BaseException | None:
        return self.error

    def add_done_callback(self, callback: Callable[[Commit], object]) -> None:
        if self.settled:
            callback(self)
        else:
            self._callbacks.append(callback)

    def settle(self, error: BaseException | None = None) -> None:
        self.settled, self.error = True, error
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:  # one waiter's bug must not keep the others waiting
                log.exception("error in a commit callback")

    def __await__(self) -> Generator[Any, None, None]:
        future = asyncio.get_running_loop().create_future()

        def resolve(commit: Commit) -> None:
            if not future.done():
                if commit.error is None:
                    future.set_result(None)
                else:
                    future.set_exception(commit.error)

        self.add_done_callback(resolve)
        yield from future
