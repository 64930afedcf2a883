"""Configuration: precedence, validation messages that name the key, check-config."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kmsclient import cli as kmsclient_cli
from kmsd import cli, config
from kmsd.cli import build_parser
from kmsd.protocol.products import products
from tests.conftest import run_kmsd

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "kmsd.toml"
EPID = "03612-00206-556-123727-03-1033-17763.0000-2972018"
WIN = products().sku_by_name("Windows 10/11 Enterprise")


def resolve(argv: list[str], env: dict[str, str]) -> config.Effective:
    return config.resolve(vars(build_parser().parse_args(argv)), env)


def test_precedence_cli_over_environment_over_file_over_defaults(tmp_path: Path) -> None:
    file = tmp_path / "kmsd.toml"
    file.write_text(
        '[network]\nidle_timeout = 5\nlisten = ["127.0.0.1:2000"]\n'
        "[host]\nstrict = true\n[table]\nprecharge = 3\n"
    )
    env = {"KMSD_CONFIG": str(file), "KMSD_IDLE_TIMEOUT": "6", "KMSD_PRECHARGE": "4"}
    eff = resolve(["--idle-timeout", "7"], env)
    assert eff.values["idle_timeout"] == 7.0 and eff.sources["idle_timeout"] == "command line"
    assert eff.values["precharge"] == 4 and eff.sources["precharge"] == "environment"
    assert eff.values["strict"] is True and eff.sources["strict"] == str(file)
    assert eff.values["listen"] == [("127.0.0.1", 2000)]
    assert eff.values["renewal_interval"] == 10080 and eff.sources["renewal_interval"] == "default"
    eff = resolve([], {"KMSD_CONFIG": str(file)})
    assert eff.values["idle_timeout"] == 5.0
    eff = resolve(["--config", str(file), "--no-ndr64", "--listen", "[::1]:1688"], {})
    assert eff.values["ndr64"] is False and eff.values["listen"] == [("::1", 1688)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[network]\nlisten = ["1.2.3.4:99999"]\n',
            "network.listen: '1.2.3.4:99999': port must be",
        ),
        ('[network]\nlisten = "1.2.3.4:1688"\n', "network.listen: expected an array"),
        ("[network]\nmax_pdu = 100\n", "network.max_pdu: '100' must be between 1432 and 65535"),
        ("[network]\nndr64 = 1\n", "network.ndr64: expected true or false"),
        (
            "[network]\nstrict = true\n",
            "network.strict: unknown option (did you mean host.strict?)",
        ),
        ("[nonsense]\nzone = 'x'\n", "[nonsense]: unknown table"),
        ('[host]\nhwid = "12"\n', "host.hwid: '12': HWID must be 16 hex digits"),
        (
            '[host]\nepid = ["Nope=03612-00206-556-123727-03-1033-17763.0000-2972018"]\n',
            "host.epid: unknown product 'Nope' (a KMS ID, KMS group or product name)",
        ),
        ("[table\n", "not valid TOML"),
    ],
)
def test_file_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "bad.toml"
    file.write_text(text)
    with pytest.raises(config.ConfigError) as info:
        resolve(["--config", str(file)], {})
    assert message in str(info.value)
    assert str(file) in str(info.value)


def test_environment_errors_name_the_variable() -> None:
    with pytest.raises(config.ConfigError, match="KMSD_IDLE_TIMEOUT: 'soon' is not a number"):
        resolve([], {"KMSD_IDLE_TIMEOUT": "soon"})
    with pytest.raises(config.ConfigError, match="KMSD_LISTNE: unknown option"):
        resolve([], {"KMSD_LISTNE": "1.2.3.4"})
    eff = resolve([], {"KMSD_LISTEN": "127.0.0.1:1, [::1]:2", "KMSD_STRICT": "yes"})
    assert eff.values["listen"] == [("127.0.0.1", 1), ("::1", 2)] and eff.values["strict"]


def test_variables_of_kmsd_that_are_not_options_are_left_alone() -> None:
    """KMSD_PURE_PYTHON (README, kmsd.protocol.crypto) and the test suite's variables are
    read elsewhere: a daemon started with them set must not refuse them as options."""
    others = {name: "1" for name in config.NOT_OPTIONS if name != "KMSD_CONFIG"}
    assert {"KMSD_PURE_PYTHON", "KMSD_PRISTINE", "KMSD_CI_CACHE"} <= set(others)
    assert resolve([], {**others, "KMSD_STRICT": "yes"}).values["strict"]


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="cannot read"):
        resolve(["--config", str(tmp_path / "none.toml")], {})


# Options given on the command line by the check-config test, and read back from its output.
CHECKED = (
    "--strict",
    "--epid",
    "Windows 10/11 Enterprise=03612-00206-556-123727-03-1033-17763.0000-2972018",
    "--hwid",
    "3a1c049600b60076",
    "--allow",
    "10.0.0.0/8",
    "--db",
    ":memory:",
)


@pytest.mark.system
def test_check_config_prints_a_file_that_reads_back_the_same(tmp_path: Path) -> None:
    result = run_kmsd("check-config", *CHECKED)
    assert result.returncode == 0, result.stderr
    assert "strict = true  # command line" in result.stdout
    assert "idle_timeout = 30.0  # default" in result.stdout
    printed = tmp_path / "printed.toml"
    printed.write_text(result.stdout)
    tomllib.loads(result.stdout)
    again = resolve(["--config", str(printed)], {})
    original = resolve(
        list(CHECKED),
        {},
    )
    assert again.values == original.values


@pytest.mark.system
def test_bad_configuration_exits_2_without_traceback(tmp_path: Path) -> None:
    file = tmp_path / "bad.toml"
    file.write_text("[network]\nidle_timeout = -1\n")
    result = run_kmsd("--config", str(file))
    assert result.returncode == 2
    assert re.search(r"network\.idle_timeout: '-1' must be between 0.001 and 604800", result.stderr)
    assert "Traceback" not in result.stderr


def test_example_file_documents_every_option_with_valid_values() -> None:
    section = ""
    seen = set()
    for line in EXAMPLE.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif line.startswith("# ") and " = " in line:
            key, value = line[2:].split(" = ", 1)
            option = config.BY_NAME[key]
            assert option.section == section, key
            config._from_toml(option, tomllib.loads(f"v = {value}")["v"])
            seen.add(key)
    assert seen == set(config.BY_NAME)


def test_settings_are_typed_and_in_seconds(tmp_path: Path) -> None:
    """Each section goes to its owner's type; days, hours and minutes become seconds once."""
    given = vars(
        build_parser().parse_args(
            [
                "--record-lifetime",
                "2",
                "--history-days",
                "0",
                "--max-clock-skew",
                "4",
                "--listen",
                "127.0.0.1:2000",
                "--epid",
                f"Windows 10/11 Enterprise={EPID}",
            ]
        )
    )
    effective, settings = config.load(given, {"KMSD_DB": str(tmp_path / "x.db")})
    assert effective.values["record_lifetime"] == 2.0  # as written, for check-config
    assert settings.table.lifetime == 2 * 86400 and settings.table.history is None
    assert settings.table.path == str(tmp_path / "x.db")
    assert settings.host.policy.max_clock_skew == 4 * 3600
    assert settings.host.policy.renewal_interval == 10080  # minutes, as the wire carries it
    assert settings.network.listen == (("127.0.0.1", 2000),)
    assert WIN and dict(settings.host.epids) == {WIN.kms.id: EPID}
    assert settings.dns == () and settings.admin is None
    assert config.defaults().table.history == 180 * 86400


@pytest.mark.system
def test_dns_serve_loads_neither_store_nor_host_nor_crypto() -> None:
    """`kmsd dns-serve` reads its options through kmsd.config without loading the daemon."""
    code = (
        "import asyncio, sys\n"
        "from kmsd import cli\n"
        "def run(coro):\n"
        "    coro.close()\n"
        "    print(' '.join(sorted(sys.modules)))\n"
        "asyncio.run = run\n"
        "cli.main(['dns-serve', 'lab.test', '--kms', '127.0.0.1'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(result.stdout.split())
    assert "kmsd.dns.responder" in loaded  # the command did run up to serving
    heavy = {"sqlite3", "kmsd.store", "kmsd.host", "kmsd.protocol.crypto", "kmsd.server"}
    assert not heavy & loaded


@pytest.mark.system
def test_unusable_publish_key_is_a_configuration_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.key"
    for command in (["check-config"], []):
        result = run_kmsd(
            *command,
            "--publish-zone",
            "lab.test",
            "--publish-key",
            str(missing),
            "--db",
            ":memory:",
        )
        assert result.returncode == 2, result.stderr
        assert f"dns.publish_key: {missing}: cannot read: No such file" in result.stderr


def _undocumented(parser: argparse.ArgumentParser, where: str) -> list[str]:
    """Arguments of `parser` (and of its subcommands) that --help shows without a text."""
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += _undocumented(sub, f"{where} {name}")
        elif not action.help and action.help != argparse.SUPPRESS:
            missing.append(f"{where}: {action.dest}")
    return missing


def test_every_argument_of_every_command_has_help_text() -> None:
    missing = _undocumented(build_parser(), "kmsd")
    for name in cli.COMMANDS:
        missing += _undocumented(cli.command_parser(name), f"kmsd {name}")
    missing += _undocumented(kmsclient_cli.build_parser(), "kmsclient")
    assert not missing
