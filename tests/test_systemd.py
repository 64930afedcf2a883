"""systemd: notify messages on a real $NOTIFY_SOCKET, socket activation through an inherited
fd 3, MemoryDenyWriteExecute=yes emulated with the same seccomp filter, and the unit files
checked by systemd-analyze (verify, and security --offline with its exposure score)."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmsclient.session import KmsConnection
from kmsd import systemd
from kmsd.protocol.client import base_request
from kmsd.protocol.products import products
from tests.conftest import LOOPBACK, KmsdProcess, stop_kmsd

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
WIN = products().sku_by_name("Windows 10/11 Enterprise")
TIMEOUT = 10.0
# The exposure `systemd-analyze security --offline=true` gives kmsd.service (README.md says it).
EXPOSURE = 1.1


def kmsd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kmsd", "--log-format", "json", "--db", ":memory:", *args]


def spawn(argv: list[str], env: dict[str, str], **kw: Any) -> KmsdProcess:
    proc = subprocess.Popen(
        argv, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, **kw
    )
    return KmsdProcess(proc, LOOPBACK, 0)


async def activate(host: str, port: int, major: int = 6) -> int:
    assert WIN
    conn = await asyncio.wait_for(KmsConnection.open(host, port), TIMEOUT)
    try:
        reply = await asyncio.wait_for(conn.activate(base_request(WIN, major=major)), TIMEOUT)
    finally:
        await conn.close()
    return reply.base.count


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(TIMEOUT)
    yield sock, path
    sock.close()


def receive_until(sock: socket.socket, wanted: str) -> list[str]:
    """Messages up to and including the first holding the line `wanted` (bounded by the
    socket's timeout)."""
    seen = []
    while True:
        message = sock.recv(4096).decode()
        seen.append(message)
        if wanted in message.splitlines():
            return seen


# sd_notify


def test_notify_without_socket_does_nothing() -> None:
    assert systemd.notify("READY=1", {}) is False
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": "relative/path"}) is False


def test_notify_abstract_namespace() -> None:
    name = f"kmsd-test-{os.getpid()}-{os.urandom(4).hex()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(TIMEOUT)
        assert systemd.notify("STATUS=hello\nREADY=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STATUS=hello\nREADY=1"


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert systemd.watchdog_interval({}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    mine = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert systemd.watchdog_interval(mine) == 0.5
    assert systemd.watchdog_interval({**mine, "WATCHDOG_PID": "1"}) is None  # not for us


def test_kmsd_notifies_ready_watchdog_and_stopping(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    kmsd = spawn(
        kmsd_command("--listen", f"{LOOPBACK}:0"),
        {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"},  # pings every 0.1 s
    )
    try:
        ready = receive_until(sock, "READY=1")[-1].splitlines()
        assert any(re.fullmatch(r"STATUS=serving on 127\.0\.0\.1:\d+", line) for line in ready)
        watchdog = receive_until(sock, "WATCHDOG=1")
        watchdog += receive_until(sock, "WATCHDOG=1")  # and again: a timer, not a one-off
        assert "READY=1" not in "\n".join(watchdog)
        kmsd.process.send_signal(signal.SIGTERM)
        stopping = receive_until(sock, "STOPPING=1")[-1]
        assert "STATUS=stopping" in stopping.splitlines()
        assert kmsd.process.wait(timeout=TIMEOUT) == 0  # one SIGTERM is enough
    finally:
        assert stop_kmsd(kmsd) == 0


def test_kmsd_reports_why_it_cannot_start(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        kmsd = spawn(kmsd_command("--listen", f"{LOOPBACK}:{port}"), {"NOTIFY_SOCKET": path})
        assert kmsd.process.wait(TIMEOUT) == 1
    kmsd.drain()
    message = sock.recv(4096).decode()
    assert message.startswith("STATUS=cannot start:")
    assert f"cannot listen on 127.0.0.1:{port}" in message


# Socket activation

ACTIVATE = textwrap.dedent(
    """
    import os, sys
    fds = [int(fd) for fd in os.environ.pop("TEST_FDS").split(",")]
    # Move the sockets to 3, 4, ... as systemd does (through free numbers, so none is lost).
    high = [os.dup(fd) for fd in fds]
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i)
        os.set_inheritable(3 + i, True)
    for fd in set(fds + high) - set(range(3, 3 + len(fds))):
        os.close(fd)
    os.environ["LISTEN_FDS"] = str(len(fds))
    os.environ["LISTEN_PID"] = str(os.getpid())  # exec keeps the pid: kmsd's
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
    """
)


def listening(host: str = LOOPBACK) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, 0))
    sock.listen()
    return sock


def activated_kmsd(sockets: list[socket.socket], *args: str) -> KmsdProcess:
    """kmsd started as systemd starts it: the sockets as fds 3, 4, ... with LISTEN_FDS and
    LISTEN_PID set to its own pid."""
    fds = [s.fileno() for s in sockets]
    argv = [sys.executable, "-c", ACTIVATE, *kmsd_command(*args)[1:]]
    return spawn(argv, {"TEST_FDS": ",".join(map(str, fds))}, pass_fds=fds)


async def test_socket_activation_serves_the_inherited_sockets() -> None:
    first, second = listening(), listening()
    ports = [first.getsockname()[1], second.getsockname()[1]]
    # --listen would fail (a documentation address, not on this machine): ignored.
    kmsd = activated_kmsd([first, second], "--listen", "192.0.2.1:1688")
    try:
        first.close()
        second.close()  # kmsd holds its own copies
        addresses = [kmsd.read_log_until("listening") for _ in range(2)]
        assert [a["address"] for a in addresses] == [f"{LOOPBACK}:{p}" for p in ports]
        assert all(a["inherited"] is True for a in addresses)
        kmsd.read_log_until("kmsd ready")
        assert await activate(LOOPBACK, ports[0]) == 1
        assert await activate(LOOPBACK, ports[1], major=4) == 2
    finally:
        assert stop_kmsd(kmsd) == 0


def test_listen_fds_for_another_process_are_ignored() -> None:
    env = {"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "kms"}
    assert systemd.listen_sockets(env) == []
    assert env == {}  # unset, as sd_listen_fds(1) does: not for children


def test_inherited_socket_must_be_a_listening_tcp_socket() -> None:
    kmsd = activated_kmsd([socket.socket(socket.AF_INET, socket.SOCK_DGRAM)])
    assert kmsd.process.wait(TIMEOUT) == 1
    kmsd.drain()
    errors = [e for e in kmsd.log if e.get("event") == "cannot start"]
    assert errors and "descriptor 3 is not a listening TCP socket" in str(errors[0]["error"])


# MemoryDenyWriteExecute=yes: the filter systemd installs, installed here with libseccomp.

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000


class ArgCmp(ctypes.Structure):
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


def deny_write_execute() -> None:
    """What systemd's MemoryDenyWriteExecute=yes does (seccomp-util.c): EPERM for mmap with
    PROT_WRITE|PROT_EXEC, mprotect/pkey_mprotect adding PROT_EXEC, shmat with SHM_EXEC."""
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp"), use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(ArgCmp),
    ]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    errno_eperm = 0x00050000 | 1
    rules = [
        ("mmap", 2, PROT_WRITE | PROT_EXEC),
        ("mprotect", 2, PROT_EXEC),
        ("pkey_mprotect", 2, PROT_EXEC),
        ("shmat", 2, SHM_EXEC),
    ]
    for name, arg, mask in rules:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        cmp = ArgCmp(arg, SCMP_CMP_MASKED_EQ, mask, mask)
        assert lib.seccomp_rule_add_array(ctx, errno_eperm, nr, 1, ctypes.byref(cmp)) == 0
    assert lib.seccomp_load(ctx) == 0


MDWX = textwrap.dedent(
    """
    import mmap, os, sys
    sys.path.insert(0, os.environ["TEST_ROOT"])
    from tests.test_systemd import deny_write_execute
    deny_write_execute()
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except PermissionError:
        pass
    else:
        sys.exit("the filter does not deny W+X memory")
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
    """
)


@pytest.mark.skipif(ctypes.util.find_library("seccomp") is None, reason="no libseccomp")
async def test_kmsd_runs_under_memory_deny_write_execute() -> None:
    """The event loop (uvloop when installed), cryptography (V5/V6 AES) and the C Rijndael
    (V4/V6) need no writable executable memory."""
    argv = [sys.executable, "-c", MDWX, *kmsd_command("--listen", f"{LOOPBACK}:0")[1:]]
    kmsd = spawn(argv, {"TEST_ROOT": str(ROOT)})
    try:
        address = str(kmsd.read_log_until("listening")["address"])
        port = int(address.rpartition(":")[2])
        kmsd.read_log_until("kmsd ready")
        counts = [await activate(LOOPBACK, port, major) for major in (4, 5, 6)]
        assert counts == [1, 2, 3]
    finally:
        assert stop_kmsd(kmsd) == 0
    assert not [e for e in kmsd.log if e.get("level") == "error"]


# The unit files

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")


def units_here(tmp_path: Path) -> Path:
    """The units with ExecStart= pointing at this machine's kmsd (verify checks it exists):
    the one installed beside the running interpreter (a venv's bin/), else the one on PATH."""
    here = os.pathsep.join((os.path.dirname(sys.executable), os.environ.get("PATH", "")))
    kmsd = shutil.which("kmsd", path=here)
    assert kmsd, "the kmsd command is not installed beside this Python nor on PATH"
    text = (UNITS / "kmsd.service").read_text()
    assert "ExecStart=/usr/local/bin/kmsd\n" in text
    (tmp_path / "kmsd.service").write_text(text.replace("/usr/local/bin/kmsd", kmsd))
    shutil.copy(UNITS / "kmsd.socket", tmp_path / "kmsd.socket")
    return tmp_path


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE
    return subprocess.run(
        [ANALYZE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )


@needs_analyze
def test_units_verify_without_any_warning(tmp_path: Path) -> None:
    units = units_here(tmp_path)
    result = analyze("verify", str(units / "kmsd.service"), str(units / "kmsd.socket"))
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr
    # ... and the check does see problems:
    bad = units / "kmsd.service"
    bad.write_text(
        bad.read_text().replace("\nType=notify\n", "\nType=notify\nProtectSystm=strict\n")
    )
    result = analyze("verify", str(bad))
    assert "Unknown key 'ProtectSystm'" in result.stderr, result.stderr


@needs_analyze
def test_service_sandbox_exposure(tmp_path: Path, record_property: object) -> None:
    units = units_here(tmp_path)
    result = analyze("security", "--offline=true", "--no-pager", str(units / "kmsd.service"))
    assert result.returncode == 0, result.stderr
    found = re.search(r"Overall exposure level for kmsd\.service: (\d+\.\d)", result.stdout)
    assert found, result.stdout
    score = float(found.group(1))
    print(f"systemd-analyze security --offline=true kmsd.service: {score}")
    assert callable(record_property)
    record_property("systemd_exposure", score)
    assert score <= EXPOSURE, result.stdout  # lower is fine: update EXPOSURE and README.md
    readme = (ROOT / "README.md").read_text()
    assert f"exposure {EXPOSURE}" in readme
    # Only what a network daemon needs stays open: its network and its own file system view.
    open_items = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("✗")}
    assert open_items <= {
        "RootDirectory=/RootImage=",
        "RestrictAddressFamilies=~AF_UNIX",
        "RestrictAddressFamilies=~AF_(INET|INET6)",
        "PrivateNetwork=",
        "IPAddressDeny=",
        "DeviceAllow=",
    }, result.stdout


def test_service_file_essentials() -> None:
    service = (UNITS / "kmsd.service").read_text()
    socket_unit = (UNITS / "kmsd.socket").read_text()
    for line in (
        "Type=notify",
        "DynamicUser=yes",
        "StateDirectory=kmsd",
        "ProtectSystem=strict",
        "PrivateDevices=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        "CapabilityBoundingSet=",
        "MemoryDenyWriteExecute=yes",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ):
        assert f"\n{line}\n" in service, line
    assert "ListenStream=0.0.0.0:1688\nListenStream=[::]:1688\n" in socket_unit
    assert "BindIPv6Only=ipv6-only" in socket_unit  # two sockets: IPv4 peers stay IPv4
