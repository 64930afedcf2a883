"""The README's set-up commands, run as a new user would, on a pristine Debian 12 (bookworm).

A minimal root is bootstrapped with debootstrap from the Debian archive this machine's apt uses,
the checkout (its committed files, `git archive HEAD`) copied in, and inside it, in a chroot as
root: the quick start (install, then kmsd on a loopback port and one `kmsclient activate` that
must get a verified answer), the install part of the test command (its venv must collect the
suite), and the systemd section up to `systemctl`, after which `systemd-analyze verify` checks
the unit as installed. Every command is read from README.md (tests/readme.py), so the README
and this check cannot drift.

It takes minutes and root, so it runs in CI (CI set) or when KMSD_PRISTINE=1. The bootstrapped
root is cached per ISO week in $KMSD_CI_CACHE (default /var/cache/kmsd-ci), with apt's and pip's
downloads; without a cache everything is fetched afresh. The time of each README command is
printed at the end of the session.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import readme
from tests.conftest import free_tcp_port, read_until

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("KMSD_CI_CACHE", "/var/cache/kmsd-ci"))
SUITE = "bookworm"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CHECKOUT = "/root/kmsd"

ENABLED = bool(os.environ.get("CI") or os.environ.get("KMSD_PRISTINE"))
LONG = pytest.mark.skipif(
    not ENABLED, reason="minutes long: runs in CI (CI set) or with KMSD_PRISTINE=1"
)

# Download caches kept between runs on this machine (like a local mirror: the root itself is
# pristine each time): apt's .deb files and pip's wheels.
DOWNLOADS = {"apt-archives": "var/cache/apt/archives", "pip-cache": "root/.cache/pip"}

TIMINGS: list[tuple[str, float]] = []  # (README command, seconds): printed by conftest


# The host's Debian archive and network settings


def debian_sources(etc: Path = Path("/etc/apt")) -> list[tuple[str, list[str], list[str]]]:
    """(URI, suites, components) of the host's enabled `deb` entries for SUITE and its
    -updates/-security suites, from sources.list, *.list and deb822 *.sources files."""
    entries: list[tuple[str, list[str], list[str]]] = []
    files = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]
    for path in files:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                entries.append((words[1], [words[2]], words[3:]))
    for path in sorted((etc / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
                suites = fields.get("suites", "").split()
                components = fields.get("components", "").split()
                entries.extend((uri, suites, components) for uri in fields.get("uris", "").split())
    ours = {SUITE, f"{SUITE}-updates", f"{SUITE}-security"}
    return [
        (uri, [s for s in suites if s in ours], components)
        for uri, suites, components in entries
        if ours & set(suites)
    ]


def test_debian_sources_reads_both_formats(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# a comment\ndeb [arch=amd64] http://mirror.test/debian bookworm main contrib\n"
        "deb-src http://mirror.test/debian bookworm main\ndeb http://other.test/x stable main\n"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.test/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\nTypes: deb\nURIs: http://off.test/\nSuites: bookworm\n"
        "Components: main\nEnabled: no\n"
    )
    assert debian_sources(tmp_path) == [
        ("http://mirror.test/debian", ["bookworm"], ["main", "contrib"]),
        ("http://mirror.test/debian-security", ["bookworm-security"], ["main"]),
    ]


def mirror() -> str:
    """The host's archive for SUITE itself: where debootstrap fetches from."""
    for uri, suites, _ in debian_sources():
        if SUITE in suites:
            return uri
    pytest.fail(f"this machine's apt has no `deb` entry for {SUITE} to bootstrap from")


def bootstrapped_root() -> Path:
    """A tarball of a minimal Debian root, made at most once per ISO week."""
    year, week, _ = dt.date.today().isocalendar()
    tarball = CACHE / f"{SUITE}-minbase-{year}-W{week:02}.tar"
    if tarball.exists():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        target = Path(work) / "root"
        started = time.monotonic()
        run(["debootstrap", "--variant=minbase", SUITE, str(target), mirror()], timeout=1200)
        TIMINGS.append(("debootstrap (cached per ISO week)", time.monotonic() - started))
        partial = tarball.with_suffix(".partial")
        run(["tar", "-C", str(target), "-cf", str(partial), "."], timeout=600)
        partial.rename(tarball)
    for old in CACHE.glob(f"{SUITE}-minbase-*.tar"):
        if old != tarball:
            old.unlink()
    return tarball


def run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        pytest.fail(f"{argv} exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done


def copy_network_settings(root: Path) -> None:
    """What lets this machine reach the archive and PyPI: resolv.conf, apt's Acquire settings
    (proxies, validity checks), the host's Debian sources, local CA certificates (installed by
    ca-certificates when a package pulls it in) and pip's configuration."""
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    for conf in Path("/etc/apt/apt.conf.d").glob("*"):
        if conf.is_file() and re.search(r"^\s*Acquire", conf.read_text(errors="replace"), re.M):
            shutil.copy(conf, root / "etc/apt/apt.conf.d" / conf.name)
    stanzas = [
        f"Types: deb\nURIs: {uri}\nSuites: {' '.join(suites)}\nComponents: {' '.join(comps)}\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        for uri, suites, comps in debian_sources()
    ]
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    (root / "etc/apt/sources.list.d/debian.sources").write_text("\n".join(stanzas))
    local_ca = root / "usr/local/share/ca-certificates"
    local_ca.mkdir(parents=True, exist_ok=True)
    for cert in Path("/usr/local/share/ca-certificates").glob("*.crt"):
        shutil.copy(cert, local_ca / cert.name)
    for conf in (Path("/etc/pip.conf"), Path("/etc/xdg/pip"), *_pip_config_file()):
        if conf.is_dir():
            shutil.copytree(conf, root / conf.relative_to("/"), dirs_exist_ok=True)
        elif conf.is_file():
            (root / conf.parent.relative_to("/")).mkdir(parents=True, exist_ok=True)
            shutil.copy(conf, root / conf.relative_to("/"))


def _pip_config_file() -> list[Path]:
    named = os.environ.get("PIP_CONFIG_FILE")
    return [Path(named)] if named and Path(named).is_absolute() else []


def chroot_env() -> list[str]:
    """A login-like environment for root, plus this machine's PIP_* settings."""
    pip = [f"{k}={v}" for k, v in os.environ.items() if k.startswith("PIP_")]
    return ["HOME=/root", f"PATH={PATH}", "LANG=C.UTF-8", *pip]


@contextlib.contextmanager
def debian() -> Iterator[Path]:
    """A fresh root from the cached tarball, /proc, /sys and /dev mounted, the checkout in
    /root/kmsd; unmounted and removed afterwards."""
    if os.geteuid() != 0:
        pytest.fail("needs root (debootstrap, chroot, mount)")
    if shutil.which("debootstrap") is None:
        pytest.fail("debootstrap is missing: the README's test command installs it")
    tarball = bootstrapped_root()
    root = Path(tempfile.mkdtemp(dir=CACHE, prefix="root-"))
    mounts: list[Path] = []
    try:
        run(["tar", "-C", str(root), "-xpf", str(tarball)], timeout=600)
        copy_network_settings(root)
        checkout = root / CHECKOUT.lstrip("/")
        checkout.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "HEAD"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-C", str(checkout), "-x"], input=archive, check=True)
        for fs, where in (("proc", "proc"), ("sysfs", "sys")):
            run(["mount", "-t", fs, fs, str(root / where)], timeout=30)
            mounts.append(root / where)
        run(["mount", "--rbind", "/dev", str(root / "dev")], timeout=30)
        mounts.append(root / "dev")
        run(["mount", "--make-rslave", str(root / "dev")], timeout=30)
        for cache, inside in DOWNLOADS.items():  # what was downloaded before, not installed
            (CACHE / cache).mkdir(exist_ok=True)
            (root / inside).mkdir(parents=True, exist_ok=True)
            run(["mount", "--bind", str(CACHE / cache), str(root / inside)], timeout=30)
            mounts.append(root / inside)
        yield root
    finally:
        remove_root(root)


def mounted_under(root: Path) -> list[Path]:
    """Every mount point at or below `root` (from /proc/self/mountinfo), deepest first."""
    below: list[Path] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = Path(line.split()[4].encode().decode("unicode_escape"))
        if point == root or root in point.parents:
            below.append(point)
    return sorted(below, key=lambda point: len(point.parts), reverse=True)


def remove_root(root: Path) -> None:
    """Unmount everything below `root`, then delete it without ever crossing into another
    file system (the host's /dev and the download caches are bind-mounted inside)."""
    for point in mounted_under(root):
        subprocess.run(["umount", str(point)], check=False, capture_output=True)
    for point in mounted_under(root):  # still busy: detach lazily
        subprocess.run(["umount", "-l", str(point)], check=False, capture_output=True)
    left = mounted_under(root)
    if left:
        pytest.fail(f"could not unmount {left}; {root} left in place")
    subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)


def in_root(root: Path, command: str, label: str, timeout: float = 2700) -> str:
    """Run a shell command in the checkout inside the root; time it; its output."""
    started = time.monotonic()
    done = subprocess.run(
        ["chroot", str(root), "/usr/bin/env", "-i", *chroot_env(), "/bin/sh", "-c",
         f"cd {CHECKOUT} && {command}"],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    if label:
        TIMINGS.append((label, elapsed))
    if done.returncode != 0:
        pytest.fail(
            f"in the pristine root, {command!r} exited {done.returncode}:\n"
            f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return done.stdout


def check_readme_setup(debian: Path) -> None:
    # Quick start: everything before the final `kmsd`, then kmsd itself on a loopback port.
    *install, daemon = readme.split_and(readme.command("quick-start"))
    assert daemon.split()[0] == "kmsd", "the quick start ends by starting kmsd"
    in_root(debian, " && ".join(install), "quick start: install (apt-get pipx, pipx install)")
    port = free_tcp_port()
    started = time.monotonic()
    kmsd = subprocess.Popen(
        ["chroot", str(debian), "/usr/bin/env", "-i", *chroot_env(), "/bin/sh", "-c",
         f"cd {CHECKOUT} && exec {daemon} --listen 127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert kmsd.stderr is not None
        said = read_until(kmsd.stderr.fileno(), "kmsd ready", time.monotonic() + 60)
        if "kmsd ready" not in said:
            pytest.fail(f"kmsd did not become ready in the pristine root:\n{said}")
        # The quick start installs a compiler: the ciphers are the compiled ones.
        assert "crypto=compiled" in said, said
        TIMINGS.append(("quick start: kmsd until ready", time.monotonic() - started))
        answer = json.loads(
            in_root(debian, f"kmsclient activate 127.0.0.1:{port} --json || [ $? = 3 ]",
                    "kmsclient activate (one verified exchange)")
        )  # fmt: skip
    finally:
        kmsd.terminate()
        kmsd.wait(timeout=20)
    assert answer["status"] in ("activated", "below_threshold"), answer  # a verified reply
    assert answer["response"]["count"] >= 1

    # The test command's install part: its venv must hold everything the suite imports.
    *install, pytest_run, compiled_run = readme.split_and(readme.command("test"))
    assert (pytest_run, compiled_run) == (".venv/bin/python -m pytest", "sh tests/compiled.sh")
    in_root(debian, " && ".join(install), "test command: install (apt-get, venv, pip)")
    in_root(debian, ".venv/bin/python -m pytest --collect-only -q", "test suite: collect")

    # The systemd section as far as it goes without a running systemd, then the units checked.
    lines = readme.block_lines("systemd")
    ran = [line for line in lines[: _first_systemctl(lines)]]
    assert any(line.startswith("install ") and "kmsd.service" in line for line in ran)
    in_root(debian, " && ".join(ran), "systemd section: install the units")
    in_root(
        debian,
        "systemd-analyze verify /etc/systemd/system/kmsd.service /etc/systemd/system/kmsd.socket",
        "",
    )


@contextlib.contextmanager
def one_at_a_time() -> Iterator[None]:
    """Runs on one machine share the cache (the weekly root, apt's and pip's downloads, where
    apt takes its own lock): a second run waits for the first."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class Background(threading.Thread):
    """The whole check, started when the session has collected it (conftest), so that its
    minutes of apt, pip and dpkg overlap the rest of the suite; the test waits for it."""

    def __init__(self) -> None:
        super().__init__(name="pristine-debian", daemon=True)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with one_at_a_time(), debian() as root:
                check_readme_setup(root)
        except BaseException as exc:  # pytest.fail's exception too: re-raised by the test
            self.error = exc


BACKGROUND: list[Background] = []


def start_in_background() -> None:
    if ENABLED and not BACKGROUND:
        BACKGROUND.append(Background())
        BACKGROUND[0].start()


@LONG
@pytest.mark.timeout(4000)
def test_readme_setup_on_pristine_debian() -> None:
    start_in_background()  # already running when the whole suite was collected
    run = BACKGROUND[0]
    run.join(timeout=3900)
    assert not run.is_alive(), "the pristine Debian check did not finish in time"
    if run.error is not None:
        raise run.error


def _first_systemctl(lines: list[str]) -> int:
    return next(i for i, line in enumerate(lines) if line.startswith("systemctl"))
