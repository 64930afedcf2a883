"""SIGHUP: read the configuration file and the environment again and apply what can change
while kmsd runs (the options marked reload in kmsd.config.OPTIONS); the command line stays
as it was given. A configuration with any error changes nothing. The files are read in a
thread, so the event loop serves on while they are."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from . import config, logs, systemd
from .host import KmsHost

if TYPE_CHECKING:
    from .dns.targets import Publications
    from .server import KmsServer
    from .store import SqliteStore

log = structlog.get_logger("kmsd")


def _show(option: config.Option, value: Any) -> Any:
    if value is None:
        return None
    if option.repeat:
        return [option.show(v) for v in value]
    return value if isinstance(value, bool | int | float) else option.show(value)


@dataclass(frozen=True)
class Prepared:
    """A configuration read and checked, ready to be put in force."""

    new: config.Effective  # as the file and the environment now say
    running: config.Effective  # what will run: the new values of the reloadable options
    settings: config.Settings  # `running`, typed
    changed: list[config.Option]


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
        server: KmsServer | None = None,
        store: SqliteStore | None = None,
    ) -> None:
        """`server`: whose behaviour rules the configuration's [[rule]] tables replace;
        `store`: where the lab override in force is recorded for `kmsd stats`."""
        self.server = server
        self.store = store
        self.cli = dict(cli)
        self.effective = effective  # what runs now, as written
        self.settings = settings  # what runs now, typed
        self.host = host
        self.publications = publications
        self.environ = environ
        self.notify = notify
        self._task: asyncio.Task[bool] | None = None
        self._again = False

    def reload(self) -> bool:
        """Read and apply the configuration as it is now, here and now; False when it has
        errors (nothing changes)."""
        self.notify("RELOADING=1\nSTATUS=reloading the configuration")
        try:
            prepared = self.prepare()
        except config.ConfigError as exc:
            return self._refuse(exc)
        self.apply(prepared)
        return True

    def request(self) -> None:
        """SIGHUP: read the files in a thread (a slow disk, or a file that is no regular
        file, never holds up the loop), then apply on the loop. A SIGHUP during a reload
        runs one more after it."""
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self.reload_off_loop())

    async def reload_off_loop(self) -> bool:
        """reload(), with the reading and checking in a thread."""
        result = False
        self._again = True
        while self._again:
            self._again = False
            self.notify("RELOADING=1\nSTATUS=reloading the configuration")
            try:
                prepared = await asyncio.to_thread(self.prepare)
            except config.ConfigError as exc:
                result = self._refuse(exc)
                continue
            self.apply(prepared)
            result = True
        return result

    async def stop(self) -> None:
        """Cancel a reload in progress (a thread still reading finishes on its own)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def prepare(self) -> Prepared:
        """Read the file and the environment again and build what would run: the running
        values, with those of the options that reload from the new ones. Only reads; safe
        in a thread. ConfigError when anything is wrong (nothing is then applied)."""
        old = self.effective
        new = config.resolve(self.cli, self.environ)
        changed = [o for o in config.OPTIONS if new.values[o.name] != old.values[o.name]]
        values, sources = dict(old.values), dict(old.sources)
        for option in changed:
            if option.reload:
                values[option.name] = new.values[option.name]
                sources[option.name] = new.sources[option.name]
        running = config.Effective(values, sources, new.config_file)
        return Prepared(new, running, config.build(running), changed)

    def apply(self, prepared: Prepared) -> None:
        """Put prepared settings in force, and say what changed."""
        old, new = self.effective, prepared.new
        self._apply(prepared.settings)
        self.effective, self.settings = prepared.running, prepared.settings
        for option in prepared.changed:
            if option.reload:
                log.info(
                    "configuration reloaded",
                    option=option.key,
                    old=_show(option, old.values[option.name]),
                    new=_show(option, new.values[option.name]),
                    source=new.sources[option.name],
                )
        pending = [o.key for o in prepared.changed if not o.reload]
        if pending:
            log.warning("changed options need a restart", options=pending)
        if not prepared.changed:
            log.info("configuration reloaded, nothing changed", file=str(new.config_file))
        self.notify(
            "READY=1\nSTATUS=configuration reloaded"
            + (f"; restart needed for {', '.join(pending)}" if pending else "")
        )

    def _refuse(self, exc: config.ConfigError) -> bool:
        log.error("reload failed, running configuration kept", problems=str(exc).splitlines())
        self.notify("READY=1\nSTATUS=reload failed: configuration errors; running as before")
        return False

    def _apply(self, new: config.Settings) -> None:
        """Hand the parts of `new` that differ from what runs to their owners."""
        old = self.settings
        if new.host.policy != old.host.policy:
            self.host.policy = new.host.policy
            if self.store is not None:
                self.store.save_override(new.host.policy.fixed_count, new.host.policy.precharge)
        if new.host.epids != old.host.epids:
            self.host.identity.overrides = dict(new.host.epids)
        if self.server is not None and new.host.rules != old.host.rules:
            self.server.rules.configure(new.host.rules, self.server.clock())
        if new.logging.level != old.logging.level:
            logs.set_level(new.logging.level)
        if self.publications is not None and new.dns != old.dns:
            self.publications.apply(new.dns)
