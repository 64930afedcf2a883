"""The build under test: interpreted (the reference) or the hot path compiled with mypyc.

README.md's test command runs the whole suite on the interpreted build, then builds a copy of
the tree with KMSD_MYPYC=1 (setup.py) and runs the pure core and the server and vectors tests
on it with KMSD_MYPYC=1 still set: these tests make sure each run tests the build it names,
so a compiled run that silently fell back to the sources cannot pass for one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kmsd import __version__
from kmsd.build import MYPYC_MODULES, build, is_compiled
from kmsd.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = "mypyc" if os.environ.get("KMSD_MYPYC", "") not in ("", "0") else "interpreted"


@pytest.mark.parametrize("module", MYPYC_MODULES)
def test_listed_module_is_a_source_file(module: str) -> None:
    assert (ROOT / Path(*module.split("."))).with_suffix(".py").is_file()


@pytest.mark.parametrize("module", MYPYC_MODULES)
def test_module_comes_from_the_build_under_test(module: str) -> None:
    assert is_compiled(module) == (EXPECTED == "mypyc")


def test_not_compiled_modules_stay_python() -> None:
    assert not is_compiled("kmsd.config")
    assert not is_compiled("kmsd.protocol.errors")


def test_version_names_the_build(capsys: pytest.CaptureFixture[str]) -> None:
    assert build() == EXPECTED
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"kmsd {__version__} ({EXPECTED})\n"
