#!/usr/bin/env python3
"""Instructions per activation log line, in process, under callgrind.

The loop below does what kmsd's server does for each activation at info level (the
`if logs.info_enabled` block of kmsd/server.py: the optional fields, then
the bound `activation` event), with a distinct client address, machine ID and workstation
name on every line and a full table (count 50 of 25; with --below, counts below the
threshold, so every line has a below_threshold field), as a busy host sees them. The lines
go to a file (as the daemon's stderr usually is: a file, a pipe or the journal).

Each format is run twice under `valgrind --tool=callgrind` with the same number of
iterations: once logging, once with the log call left out (the loop's own work, and
the interpreter's start-up, cancel out). The figure is

    (instructions logging - instructions not logging) / lines

user-space instructions (`Ir`) only; the kernel's write() is not in them. Also, at
`--log-level warning`, what the disabled line costs.

    python bench/logline.py                 # console and JSON, 20000 lines each
    python bench/logline.py --lines 5000 --formats json

This is a benchmark, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def inner(fmt: str, level: str, lines: int, log: bool, out: str, below: bool) -> None:
    """The measured loop (run under callgrind by main)."""
    sys.path.insert(0, str(ROOT))
    from kmsd import logs, server

    with open(out, "w") as file:
        sys.stderr = file
        logs.configure(fmt, level)
        activation = server._activation
        # the request's CMID text is made once, for the store's row and the log line
        cmids = [str(uuid.UUID(int=(i * 0x9E3779B97F4A7C15) % (1 << 128))) for i in range(lines)]
        names = [f"pc-{i:05d}.lab.test" for i in range(lines)]
        kms_id = uuid.UUID("8a4b2f0e-0000-0000-0000-000000000000")
        rule = None
        for i in range(lines):
            client = f"127.0.0.1:{1024 + i % 60000}"
            count = 1 + i % 24 if below else 50  # a full table: 2 x 25
            required = 25
            protocol = f"{6}.{0}"
            if log and logs.info_enabled:
                activation.emit(
                    client,
                    cmids[i],
                    names[i],
                    "Windows",
                    "Windows 10/11 Enterprise",
                    protocol,
                    "NDR64",
                    count,
                    required,
                    None if i % 1000 else f"unknown {kms_id}",
                    None
                    if count >= required
                    else f"count {count} of {required}: not activated yet; a small lab can "
                    f"start kmsd with --precharge {required - 1}",
                    None if rule is None else rule,
                )


def _instructions(args: list[str]) -> int:
    with tempfile.TemporaryDirectory() as work:
        data = os.path.join(work, "callgrind.out")
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={data}", *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        text = Path(data).read_text()
        match = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
        assert match is not None, "no totals in callgrind's output"
        return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=20000)
    parser.add_argument("--formats", nargs="+", default=["console", "json"])
    parser.add_argument(
        "--below",
        action="store_true",
        help="every count below the threshold (each line has a below_threshold field)",
    )
    parser.add_argument("--inner", nargs=4, metavar=("FMT", "LEVEL", "LOG", "OUT"))
    options = parser.parse_args()
    if options.inner:
        fmt, level, log, out = options.inner
        inner(fmt, level, options.lines, log == "log", out, options.below)
        return
    with tempfile.TemporaryDirectory() as work:
        out = os.path.join(work, "log")
        for fmt in options.formats:
            for level in ("info", "warning"):
                counts = {}
                size = 0
                for log in ("log", "none"):
                    counts[log] = _instructions(
                        [sys.executable, __file__, "--lines", str(options.lines)]
                        + (["--below"] if options.below else [])
                        + ["--inner", fmt, level, log, out]
                    )
                    size = size or os.path.getsize(out)
                per_line = (counts["log"] - counts["none"]) / options.lines
                print(
                    f"{fmt:8} {level:8} {per_line:10,.0f} instructions per line"
                    + (f" ({size / options.lines:.0f} bytes)" if size else ""),
                    flush=True,
                )


if __name__ == "__main__":
    main()
