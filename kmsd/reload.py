"""SIGHUP: read the configuration file and the environment again and apply what can change
while kmsd runs (the options marked reload in kmsd.config.OPTIONS); the command line stays
as it was given. A file with errors changes nothing."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from . import config, logs, systemd
from .host import HostPolicy, KmsHost

if TYPE_CHECKING:
    from .dns.publish import Publisher

log = structlog.get_logger("kmsd")


def host_policy(args: argparse.Namespace) -> HostPolicy:
    """The host's policy from the [host] and [table] options."""
    return HostPolicy(
        activation_interval=args.activation_interval,
        renewal_interval=args.renewal_interval,
        strict=args.strict,
        verify=args.verify,
        max_clock_skew=args.max_clock_skew * 3600 if args.max_clock_skew else None,
        fixed_count=args.fixed_count,
        precharge=args.precharge,
    )


def _show(option: config.Option, value: Any) -> Any:
    if value is None:
        return None
    if option.repeat:
        return [option.show(v) for v in value]
    return value if isinstance(value, bool | int | float) else option.show(value)


class Reloader:
    """Applies a new configuration to the running host, logger and DNS publisher."""

    def __init__(
        self,
        cli: Mapping[str, Any],
        effective: config.Effective,
        host: KmsHost,
        publisher: Publisher | None = None,
        *,
        environ: Mapping[str, str] = os.environ,
        notify: Callable[[str], object] = systemd.notify,
    ) -> None:
        self.cli = dict(cli)
        self.effective = effective  # what runs now
        self.host = host
        self.publisher = publisher
        self.environ = environ
        self.notify = notify

    def reload(self) -> bool:
        """Apply the configuration as it is now; False when it has errors (nothing changes)."""
        self.notify("RELOADING=1\nSTATUS=reloading the configuration")
        try:
            new = config.resolve(self.cli, self.environ)
        except config.ConfigError as exc:
            log.error("reload failed, running configuration kept", problems=str(exc).splitlines())
            self.notify("READY=1\nSTATUS=reload failed: configuration errors; running as before")
            return False
        old = self.effective
        changed = [o for o in config.OPTIONS if new.values[o.name] != old.values[o.name]]
        applied = [o for o in changed if o.reload]
        values = dict(old.values)
        sources = dict(old.sources)
        for option in applied:
            values[option.name] = new.values[option.name]
            sources[option.name] = new.sources[option.name]
        running = config.Effective(values, sources, new.config_file)
        if not self._apply(running, {o.name for o in applied}):
            self.notify("READY=1\nSTATUS=reload failed; running as before")
            return False
        self.effective = running
        for option in applied:
            log.info(
                "configuration reloaded",
                option=option.key,
                old=_show(option, old.values[option.name]),
                new=_show(option, new.values[option.name]),
                source=new.sources[option.name],
            )
        pending = [o.key for o in changed if not o.reload]
        if pending:
            log.warning("changed options need a restart", options=pending)
        if not changed:
            log.info("configuration reloaded, nothing changed", file=str(new.config_file))
        self.notify(
            "READY=1\nSTATUS=configuration reloaded"
            + (f"; restart needed for {', '.join(pending)}" if pending else "")
        )
        return True

    def _apply(self, running: config.Effective, names: set[str]) -> bool:
        args = running.namespace()
        publisher_settings = None
        if self.publisher is not None and any(n.startswith("publish_") for n in names):
            from .dns import publish

            try:
                publisher_settings = publish.settings_from(args)
            except (ValueError, OSError) as exc:
                log.error("reload failed, running configuration kept", problems=[str(exc)])
                return False
        self.host.policy = host_policy(args)
        self.host.identity.overrides = dict(args.epid)
        if "log_level" in names:
            logs.set_level(args.log_level)
        if self.publisher is not None and publisher_settings is not None:
            self.publisher.reconfigure(publisher_settings)
        return True
