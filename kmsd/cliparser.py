"""The argument parser of kmsd's and kmsclient's commands: argparse's, with these changes.

- A mistake is two lines, the error (with the closest option for a mistyped one) and where
  help is, instead of the whole usage (`kmsd check-config` takes 28 options) above it.
- The help is as wide as the terminal without importing shutil: argparse imports it (and
  with it bz2 and lzma, ~0.9 MiB a running daemon would keep) only to ask for the width.
  A description or epilog written with line breaks keeps them; one without is filled.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, NoReturn


def columns() -> int:
    """The terminal's width as shutil.get_terminal_size finds it: $COLUMNS, the terminal of
    standard output, else 80."""
    with contextlib.suppress(ValueError):
        if (given := int(os.environ.get("COLUMNS", "0"))) > 0:
            return given
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):  # no standard output, or not a terminal
        return 80


class HelpFormatter(argparse.HelpFormatter):
    """A description or epilog with line breaks of its own (a list) is kept as written; one
    without is filled to the width, as argparse does."""

    def __init__(
        self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
        width: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(prog, indent_increment, max_help_position, width or columns() - 2)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}{self._hint(message)}\n"
                     f"({self.prog} --help lists what it takes)\n")  # fmt: skip

    def _hint(self, message: str) -> str:
        """'; did you mean --listen?' for an unknown option close to one of this parser's
        or of its commands'."""
        prefix = "unrecognized arguments: "
        if not message.startswith(prefix):
            return ""
        unknown = [w.split("=", 1)[0] for w in message[len(prefix) :].split() if w[:2] == "--"]
        if not unknown:
            return ""
        import difflib  # only for a mistake

        close = difflib.get_close_matches(unknown[0], sorted(self._known_options()), n=1)
        return f"; did you mean {close[0]}?" if close else ""

    def _known_options(self) -> set[str]:
        known = {option for option in self._option_string_actions if option[:2] == "--"}
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    known |= {o for o in sub._option_string_actions if o[:2] == "--"}
        return known
