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
    replies leave in the same turn of the loop as the commit; it can also be awaited."""

    __slots__ = ("_callbacks", "_done", "_error")

    def __init__(self) -> None:
        self._callbacks: list[Callable[[Commit], object]] = []
        self._done = False
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._done

    def exception(self) -> BaseException | None:
        return self._error

    def add_done_callback(self, callback: Callable[[Commit], object]) -> None:
        if self._done:
            callback(self)
        else:
            self._callbacks.append(callback)

    def settle(self, error: BaseException | None = None) -> None:
        self._done, self._error = True, error
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
                if commit._error is None:
                    future.set_result(None)
                else:
                    future.set_exception(commit._error)

        self.add_done_callback(resolve)
        yield from future
