"""SIGHUP: read the configuration file and the environment again and apply what can change
while kmsd runs (the options marked reload in kmsd.config.OPTIONS); the command line stays
as it was given. A configuration with any error changes nothing."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from . import config, logs, systemd
from .host import KmsHost

if TYPE_CHECKING:
    from .dns.targets import Publications

log = structlog.get_logger("kmsd")


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
        settings: config.Settings,
        host: KmsHost,
        publications: Publications | None = None,
        *,
        environ: Mapping[str, str] = os.environ,
        notify: Callable[[str], object] = systemd.notify,
    ) -> None:
        self.cli = dict(cli)
        self.effective = effective  # what runs now, as written
        self.settings = settings  # what runs now, typed
        self.host = host
        self.publications = publications
        self.environ = environ
        self.notify = notify

    def reload(self) -> bool:
        """Apply the configuration as it is now; False when it has errors (nothing changes)."""
        self.notify("RELOADING=1\nSTATUS=reloading the configuration")
        old = self.effective
        try:
            new = config.resolve(self.cli, self.environ)
            changed = [o for o in config.OPTIONS if new.values[o.name] != old.values[o.name]]
            applied = [o for o in changed if o.reload]
            values, sources = dict(old.values), dict(old.sources)
            for option in applied:
                values[option.name] = new.values[option.name]
                sources[option.name] = new.sources[option.name]
            running = config.Effective(values, sources, new.config_file)
            settings = config.build(running)
        except config.ConfigError as exc:
            log.error("reload failed, running configuration kept", problems=str(exc).splitlines())
            self.notify("READY=1\nSTATUS=reload failed: configuration errors; running as before")
            return False
        self._apply(settings)
        self.effective, self.settings = running, settings
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

    def _apply(self, new: config.Settings) -> None:
        """Hand the parts of `new` that differ from what runs to their owners."""
        old = self.settings
        if new.host.policy != old.host.policy:
            self.host.policy = new.host.policy
        if new.host.epids != old.host.epids:
            self.host.identity.overrides = dict(new.host.epids)
        if new.logging.level != old.logging.level:
            logs.set_level(new.logging.level)
        if self.publications is not None and new.dns != old.dns:
            self.publications.apply(new.dns)
