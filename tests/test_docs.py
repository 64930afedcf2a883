"""The documentation is checked where it states facts: references into docs/protocol.md,
deploy/kmsd.toml's defaults, SECURITY.md's contact, what the README says about privileges."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from kmsd import config

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = ROOT / "docs" / "protocol.md"
SOURCES = [
    p
    for pattern in ("*.md", "kmsd/**/*.py", "kmsclient/**/*.py", "tests/*.py", "bench/*.py")
    for p in ROOT.glob(pattern)
    if p.name != "test_docs.py"
]


def headings() -> set[str]:
    """Section titles, without a trailing parenthesis: "The base request (236 bytes, ...)"."""
    text = PROTOCOL.read_text()
    return {m.group(1).strip() for m in re.finditer(r"^#+ ([^(\n]+)", text, re.M)}


def test_every_reference_names_a_section_of_the_protocol_notes() -> None:
    known = headings()
    seen = 0
    for path in SOURCES:
        text = re.sub(r"\s*\n\s*#?\s*", " ", path.read_text())  # join wrapped comments
        for match in re.finditer(r'docs/protocol\.md, ((?:"[^"]+"(?: and |, )?)+|[^)"]+)', text):
            found = match.group(1).strip().rstrip(".")
            names = re.findall(r'"([^"]+)"', found) if found[0] == '"' else found.split(", ")
            for name in names:
                assert name in known, f"{path.name}: {match.group(0)!r}"
                seen += 1
    assert seen >= 20  # the protocol modules all point there


def test_no_reference_to_a_protocol_file_outside_the_repository() -> None:
    for path in SOURCES:
        assert "PROTOCOL.md" not in path.read_text(), path


def test_kmsd_toml_shows_every_default_or_says_it_is_an_example() -> None:
    lines = (ROOT / "deploy" / "kmsd.toml").read_text().splitlines()
    assert lines[0].startswith("# kmsd configuration: every option, with its default")
    examples = 0
    marker = ""  # "one": the next option line is an example; "many": all up to a blank line
    for line in lines:
        if not line.strip():
            marker = ""
        elif "the line below is an example" in line:
            marker = "one"
        elif "the lines below are examples" in line:
            marker = "many"
        elif line.startswith("# ") and " = " in line:
            key, value = line[2:].split(" = ", 1)
            option = config.BY_NAME[key]
            shown = config._from_toml(option, tomllib.loads(f"v = {value}")["v"])
            if marker:
                examples += 1
                assert shown != option.default, f"{key}: marked as an example but is the default"
                marker = "" if marker == "one" else marker
            else:
                assert shown == option.default, f"{key}: {value} is not the default"
    assert examples > 0


def test_security_contact_is_in_the_project_metadata() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    emails = {person["email"] for person in project["authors"]}
    assert any(email in (ROOT / "SECURITY.md").read_text() for email in emails)
    assert project["urls"]


def test_port_1688_is_not_said_to_need_root() -> None:
    needs_root = re.compile(r"root\)? (?:is needed |)to bind (?:port )?1688|to bind port 1688")
    for path in (ROOT / "README.md", ROOT / "SECURITY.md", ROOT / "deploy" / "kmsd.toml"):
        assert not needs_root.search(path.read_text()), path
    assert all(not needs_root.search(o.help) for o in config.BY_NAME.values())
    readme = (ROOT / "README.md").read_text()
    assert "| `--hwid HEX16` | random per start |" not in readme


def test_every_place_that_installs_kmsd_agrees() -> None:
    """README quick start (pipx), the systemd unit, the Containerfile and CI: one path."""
    from tests import readme

    quick = readme.command("quick-start")
    bin_dir = re.search(r"PIPX_BIN_DIR=(\S+)", quick)
    assert bin_dir and "pipx install" in quick
    unit = (ROOT / "systemd" / "kmsd.service").read_text()
    assert f"ExecStart={bin_dir.group(1)}/kmsd\n" in unit
    # The image's Python is the official image's, prefix /usr/local: pip puts kmsd there too.
    containerfile = (ROOT / "deploy" / "Containerfile").read_text()
    assert re.search(r"^FROM python:\S+-slim", containerfile, re.M)
    assert bin_dir.group(1) == "/usr/local/bin"
    # CI runs the README's test command itself, which makes its own virtual environment.
    ci = (ROOT / ".ci" / "run").read_text()
    assert "command=$(python3 tests/readme.py test)" in ci and 'eval "$command"' in ci
    test = readme.command("test")
    assert "python3 -m venv .venv" in test
    # The whole suite on the interpreted build, then the compiled build's run (tests/compiled.sh).
    assert test.endswith(".venv/bin/python -m pytest && sh tests/compiled.sh")
    assert "pip install ." not in readme.README.read_text().replace(".venv/bin/pip install", "")
