"""kmsd's and kmsclient's argument parser: a mistake in two lines with the closest option,
help filled to the terminal's width, lists kept as written."""

from __future__ import annotations

import pytest

from kmsd.cliparser import Parser, columns


def parser() -> Parser:
    p = Parser(prog="tool", description="one paragraph " * 12, epilog="a list:\n  one\n  two")
    p.add_argument("--listen")
    p.add_argument("--max-connections", type=int)
    sub = p.add_subparsers(dest="command")
    sub.add_parser("activate").add_argument("--product")
    return p


def error_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    with pytest.raises(SystemExit) as stopped:
        parser().parse_args(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err.splitlines()


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["--lisen"], "; did you mean --listen?"),
        (["--max-conections=3"], "; did you mean --max-connections?"),
        (["activate", "--prodcut", "x"], "; did you mean --product?"),  # a command's option
        (["--zzzzzz"], ""),  # nothing close: no guess
    ],
)
def test_an_unknown_option_is_one_error_line_with_the_closest(
    argv: list[str], hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = error_of(argv, capsys)
    assert first.startswith("tool: error: unrecognized arguments: ") and first.endswith(hint)
    if not hint:
        assert "did you mean" not in first
    assert second == "(tool --help lists what it takes)"


def test_a_bad_value_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    first, second = error_of(["--max-connections", "many"], capsys)
    assert first == "tool: error: argument --max-connections: invalid int value: 'many'"
    assert "usage" not in second


def test_help_fills_paragraphs_to_the_width_and_keeps_lists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "42")
    assert columns() == 42
    shown = parser().format_help().splitlines()
    paragraph = [line for line in shown if "paragraph" in line]
    assert len(paragraph) > 1 and max(map(len, paragraph)) <= 40
    assert "a list:" in shown and "  one" in shown and "  two" in shown
    monkeypatch.setenv("COLUMNS", "not a number")
    assert columns() == 80  # tests run without a terminal
