"""`kmsd` command line: run the KMS host, or one of its commands.

Every command reads its options the same way as the daemon (kmsd.config: command line >
KMSD_* > configuration file > defaults, with the same errors). This module loads only the
configuration; what a command needs (the store, the host, the DNS responder) is imported
when that command runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from . import __version__, config, logs
from .build import build
from .cliparser import Parser
from .pipe import quiet_on_broken_pipe


@dataclass(frozen=True)
class Command:
    summary: str
    options: Collection[str] | None  # the kmsd options its command line takes; None: all


TABLE_OPTIONS = ("db", "record_lifetime")
COMMANDS = {
    "check-config": Command("check the configuration and print what is in force", None),
    "dns-check": Command(
        "one signed DNS update that changes nothing, per publication target", None
    ),
    "clients": Command("list the client table", TABLE_OPTIONS),
    "stats": Command("count, capacity and thresholds per application", TABLE_OPTIONS),
    "forget": Command("take one client out of the table", TABLE_OPTIONS),
    "reset": Command("empty the table (of one application)", TABLE_OPTIONS),
    "dns-serve": Command("a lab DNS responder advertising KMS hosts", ("log_format", "log_level")),
    "journal": Command("the request journal of a running kmsd (its admin endpoint)", ("admin",)),
}

# The commands that take every kmsd option and say more than their summary in --help.
DESCRIPTIONS = {
    "check-config": "Check the configuration kmsd would run with (files readable, keytabs "
    "holding their principal) and print it as a configuration file, each value with where "
    "it came from; exit status 2, and the problems, when it has errors. It takes the options "
    "kmsd takes and reads the same file and variables.",
    "dns-check": "For each DNS publication target of the configuration, send one signed "
    "update that changes nothing and report, a line each, whether the server accepts this "
    "host's credentials. It takes the options kmsd takes and reads the same file and "
    "variables.",
}


def _command_list() -> str:
    width = max(map(len, COMMANDS))
    return "\n".join(f"  {name:{width}}  {c.summary}" for name, c in COMMANDS.items())


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="kmsd",
        usage="kmsd [OPTION ...] | kmsd COMMAND [ARGUMENT ...]",
        description="A KMS (Windows Key Management Service) host emulator for labs and tests. "
        "Answers activation requests of protocol V4, V5 and V6 over DCE-RPC on TCP port 1688, "
        "counting clients as a real KMS host does (25 for Windows clients, 5 for servers "
        "and Office). Every option can also be set in the configuration file or as the "
        "environment variable in brackets; the command line wins, then the environment, "
        "then the file. A list option is repeated on the command line, an array in the "
        "file and comma-separated in its variable.",
        epilog=f"commands (each has --help):\n{_command_list()}",
    )
    p.add_argument("--version", action="version", version=f"kmsd {__version__} ({build()})")
    config.add_options(p)
    return p


def _options(names: Collection[str] | None) -> argparse.ArgumentParser:
    """A parent parser with the kmsd options a command takes."""
    parent = Parser(add_help=False)
    config.add_options(parent, names)
    return parent


def _given(args: argparse.Namespace, names: Collection[str] | None) -> dict[str, Any]:
    """The configuration options among a command's arguments (only those given)."""
    return {k: v for k, v in vars(args).items() if k == "config" or names is None or k in names}


def configuration_error(exc: config.ConfigError) -> int:
    print(f"kmsd: configuration error:\n{exc}", file=sys.stderr)
    return 2


def unknown_command(name: str) -> int:
    import difflib  # only for a mistyped command

    close = difflib.get_close_matches(name, COMMANDS, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    print(f"kmsd: unknown command '{name}'{hint}", file=sys.stderr)
    print(f"commands:\n{_command_list()}", file=sys.stderr)
    return 2


@quiet_on_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        if argv[0] not in COMMANDS:
            return unknown_command(argv[0])
        return run_command(argv[0], argv[1:])
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    try:
        effective, settings = config.load(given)
    except config.ConfigError as exc:
        return configuration_error(exc)
    logs.configure(settings.logging.format, settings.logging.level)
    from . import daemon

    return daemon.run(settings, effective, given)


def command_parser(name: str) -> argparse.ArgumentParser:
    """The command line of command `name`, with the kmsd options it takes."""
    parents = [_options(COMMANDS[name].options)]
    if name == "dns-serve":
        from .dns import responder

        return responder.build_parser(parents)
    if name == "journal":
        from . import journalcmd

        return journalcmd.build_parser(parents)
    if name in DESCRIPTIONS:
        return Parser(prog=f"kmsd {name}", description=DESCRIPTIONS[name], parents=parents)
    from . import tablecmd

    return tablecmd.build_parser(name, parents)


def run_command(name: str, argv: Sequence[str]) -> int:
    names = COMMANDS[name].options
    parser = command_parser(name)
    args = parser.parse_args(argv)
    given = _given(args, names)
    try:
        if name == "dns-serve":  # the logging options only: nothing of the daemon is built
            log = config.log_settings(config.resolve(given))
        else:
            effective, settings = config.load(given)
    except config.ConfigError as exc:
        return configuration_error(exc)
    if name == "dns-serve":
        from .dns import responder

        return responder.run(args, parser, log.format, log.level)
    if name == "check-config":
        print(config.render(effective), end="")
        return 0
    if name == "dns-check":
        from .dns import check

        return check.run(settings.dns, sys.stdout)
    if name == "journal":
        from . import journalcmd

        return journalcmd.run(args, settings.admin)
    from . import tablecmd

    return tablecmd.run(name, args, settings.table, settings.host.policy)


if __name__ == "__main__":
    sys.exit(main())
