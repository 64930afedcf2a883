"""The commands README.md shows, read from README.md itself (standard library only).

A code block that CI runs as it stands is marked by an HTML comment on the line before its
opening fence, `<!-- command: NAME -->`, invisible in the rendered README. `.ci/run` runs the
"test" block, `.ci/pristine-debian.py` the "quick-start" and "systemd" blocks and the install
part of "test" on a freshly bootstrapped Debian, so that the README and CI cannot drift.

    python3 tests/readme.py NAME      # prints the block's command
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"

_MARKED = re.compile(r"^<!-- command: ([\w-]+) -->\n```[^\n]*\n(.*?)^```$", re.M | re.S)
_FENCED = re.compile(r"^```[^\n]*\n(.*?)^```$", re.M | re.S)


def marked_blocks(text: str | None = None) -> dict[str, str]:
    """{name: block text} for every marked code block."""
    text = README.read_text("utf-8") if text is None else text
    blocks: dict[str, str] = {}
    for name, body in _MARKED.findall(text):
        if name in blocks:
            raise ValueError(f"README.md: two blocks marked {name!r}")
        blocks[name] = body
    return blocks


def command(name: str, text: str | None = None) -> str:
    """The one-line command of the block marked `name`."""
    blocks = marked_blocks(text)
    if name not in blocks:
        raise KeyError(f"README.md has no block marked <!-- command: {name} -->")
    lines = [line for line in blocks[name].splitlines() if line.strip()]
    if len(lines) != 1:
        raise ValueError(f"README.md block {name!r}: expected one command line, got {len(lines)}")
    return lines[0].strip()


def block_lines(name: str, text: str | None = None) -> list[str]:
    """The block's commands, one per line, `# comments` and continuations resolved."""
    blocks = marked_blocks(text)
    if name not in blocks:
        raise KeyError(f"README.md has no block marked <!-- command: {name} -->")
    return shell_lines(blocks[name])


def shell_lines(block: str) -> list[str]:
    """Commands of a code block: continuation lines joined, trailing comments dropped."""
    joined = re.sub(r"\\\n\s*", "", block)
    commands = []
    for line in joined.splitlines():
        code = _strip_comment(line).strip()
        if code:
            commands.append(code)
    return commands


def code_blocks(text: str | None = None) -> list[str]:
    """Every fenced code block of the README, in order."""
    text = README.read_text("utf-8") if text is None else text
    return _FENCED.findall(text)


def _strip_comment(line: str) -> str:
    """The line without a `#` comment that is outside quotes and starts a word."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def split_and(command_line: str) -> list[str]:
    """`a && b && c` -> [a, b, c] (the README's one-line commands chain with && only)."""
    return [part.strip() for part in command_line.split(" && ")]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 tests/readme.py BLOCK-NAME")
    print(command(sys.argv[1]))
