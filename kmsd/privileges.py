"""Started as root (port 1688 without systemd): run on as an ordinary user.

kmsd binds its sockets and opens its database first, then hands the database files (and
their directory when it is kmsd's own) to the user and changes user, before it serves."""

from __future__ import annotations

import codecs
import os
import pwd
from pathlib import Path

import structlog

log = structlog.get_logger("kmsd")

# Looked up lazily by Python at first use (utf-16-le: workstation names in KMS requests; idna:
# host names in socket calls): loaded while Python's library is surely readable.
PRELOADED_CODECS = ("utf-16-le", "idna")
SQLITE_SIDE_FILES = ("", "-wal", "-shm", "-journal", ".lock")


class PrivilegeError(Exception):
    """kmsd was asked to run as a user it cannot become."""


def find_user(user: str) -> pwd.struct_passwd | None:
    """A user of this system's password database, by name or numeric ID."""
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        return None


def lookup(user: str) -> pwd.struct_passwd:
    entry = find_user(user)
    if entry is None:
        raise PrivilegeError(f"user {user!r} does not exist; refusing to run as root")
    return entry


def drop_to(user: str, database: str | None) -> None:
    """Become `user` (with its primary and supplementary groups) for good.

    `database`: a database file to hand over (with its .lock and SQLite's -wal, -shm, -journal
    files, and its directory when that is named kmsd, like the default state directory)."""
    entry = lookup(user)
    if os.geteuid() != 0:
        if os.geteuid() == entry.pw_uid:
            return
        raise PrivilegeError(
            f"--user {user}: kmsd runs as uid {os.geteuid()} and cannot change user "
            "(only a kmsd started as root can)"
        )
    uid, gid = entry.pw_uid, entry.pw_gid
    if database is not None:
        file = Path(database)
        owned = [Path(f"{file}{suffix}") for suffix in SQLITE_SIDE_FILES]
        if file.parent.name == "kmsd":
            owned.append(file.parent)
        for path in owned:
            if path.exists():
                os.chown(path, uid, gid)
    for codec in PRELOADED_CODECS:
        codecs.lookup(codec)
    import concurrent.futures.thread  # noqa: F401 - asyncio.to_thread's executor, imported lazily

    code = [Path(os.__file__).parent, Path(__file__).parent]  # Python's library, kmsd
    os.initgroups(entry.pw_name, gid)
    os.setgid(gid)
    os.setuid(uid)
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise PrivilegeError(f"still able to become root after switching to {user}")
    log.info("running as user", user=entry.pw_name, uid=uid, gid=gid)
    unreadable = [str(path) for path in code if not os.access(path, os.R_OK | os.X_OK)]
    if unreadable:
        log.warning(
            "the user cannot read kmsd's code: what is not loaded yet will fail to import; "
            "install Python and kmsd where it can read them",
            user=entry.pw_name,
            paths=unreadable,
        )
