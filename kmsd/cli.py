"""`kmsd` command line: run the KMS host, or one of its commands.

Every command reads its options the same way (kmsd.config). This module loads only the
configuration; what a command needs (the store, the host, the DNS responder) is imported
when that command runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__, config, logs
from .pipe import quiet_on_broken_pipe

TABLE_COMMANDS = ("clients", "stats", "forget", "reset")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kmsd",
        description="A KMS (Windows Key Management Service) host emulator for labs and tests. "
        "Answers activation requests of protocol V4, V5 and V6 over DCE-RPC on TCP port 1688, "
        "counting clients as a real KMS host does (25 for Windows clients, 5 for servers "
        "and Office). Every option can also be set in the configuration file or as the "
        "environment variable in brackets; the command line wins, then the environment, "
        "then the file.",
        epilog="Other commands: kmsd check-config (print the effective configuration, after "
        "checking it: files readable, keytabs holding their principal); kmsd dns-check (one "
        "signed DNS update that changes nothing, per publication target); on the "
        "database, safe while kmsd runs: kmsd clients, kmsd stats, kmsd forget CLIENT_ID, "
        "kmsd reset [--app NAME]; a lab DNS responder advertising KMS hosts: kmsd dns-serve "
        "ZONE --kms IP[:PORT]; each has --help.",
    )
    p.add_argument("--version", action="version", version=f"kmsd {__version__}")
    config.add_options(p)
    return p


def configuration_error(exc: config.ConfigError) -> int:
    print(f"kmsd: configuration error:\n{exc}", file=sys.stderr)
    return 2


@quiet_on_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "dns-serve":
        from .dns import responder

        return responder.main(argv[1:])
    if argv and argv[0] in TABLE_COMMANDS:
        from . import tablecmd

        return tablecmd.main(argv)
    command = argv[0] if argv and argv[0] in ("check-config", "dns-check") else None
    parser = build_parser()
    if command is not None:
        parser.prog = f"kmsd {command}"
    given = vars(parser.parse_args(argv[1:] if command else argv))
    try:
        effective, settings = config.load(given)
    except config.ConfigError as exc:
        return configuration_error(exc)
    if command == "check-config":
        print(config.render(effective), end="")
        return 0
    if command == "dns-check":
        from .dns import check

        return check.run(settings.dns, sys.stdout)
    logs.configure(settings.logging.format, settings.logging.level)
    from . import daemon

    return daemon.run(settings, effective, given)


if __name__ == "__main__":
    sys.exit(main())
