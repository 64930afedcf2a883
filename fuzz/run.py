"""Run one fuzz target under atheris: python -m fuzz.run TARGET [libFuzzer options].

Examples:
    python -m fuzz.run connection -runs=1000000
    python -m fuzz.run kms_v6 -max_total_time=600 fuzz/corpus/kms_v6
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["kmsd", "kmsclient"]):
    from fuzz.targets import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(
            f"usage: python -m fuzz.run TARGET [libFuzzer options]; targets: {', '.join(TARGETS)}"
        )
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
