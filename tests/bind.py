"""BIND 9 (`named`, Debian's bind9) for tests: one primary zone on 127.0.0.1 at a free
port, updatable only with a TSIG key."""

from __future__ import annotations

import base64
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

KEY_NAME = "kmsd-key"
NAMED = shutil.which("named") or "/usr/sbin/named"


def installed() -> bool:
    return os.path.exists(NAMED) and shutil.which("dig") is not None


def dig(address: str, port: int, name: str, rdtype: str) -> list[str]:
    """The records `dig` gets from the server at address:port, sorted, one per line."""
    out = subprocess.run(
        ["dig", f"@{address}", "-p", str(port), name, rdtype, "+short", "+tcp", "+tries=2"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return sorted(line for line in out.splitlines() if line)


# Fixed secrets (a test must not fail one run in a hundred), with "//" in their base64 as
# tsig-keygen's keys sometimes have: named and kmsd must read them alike.
SECRET = b"\xff\xff\xff" + bytes(range(29))
WRONG_SECRET = bytes(range(29)) + b"\xff\xff\xff"


def key_file(path: Path, secret: bytes, name: str = KEY_NAME) -> Path:
    text = base64.b64encode(secret).decode()
    path.write_text(f'key "{name}" {{\n\talgorithm hmac-sha256;\n\tsecret "{text}";\n}};\n')
    return path


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (named binds both)."""
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


@dataclass
class Bind:
    process: subprocess.Popen[bytes]
    port: int
    key: Path
    log: list[str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def dig(self, name: str, rdtype: str) -> list[str]:
        return dig("127.0.0.1", self.port, name, rdtype)

    def read_until(self, text: str, timeout: float = 10.0) -> str:
        """The next line of named's log that contains `text`."""
        assert self.process.stderr is not None
        fd = self.process.stderr.fileno()
        deadline = time.monotonic() + timeout
        pending = b""
        while time.monotonic() < deadline:
            if not select.select([fd], [], [], deadline - time.monotonic())[0]:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                decoded = line.decode(errors="replace")
                self.log.append(decoded)
                if text in decoded:
                    return decoded
        raise AssertionError(f"named logged no {text!r} within {timeout} s: {self.log[-20:]}")


def running(work: Path, zone: str) -> Iterator[Bind]:
    """named serving `zone` from the directory `work` until the iterator is closed."""
    key = key_file(work / "kmsd.key", SECRET)
    port = free_port()
    (work / "named.conf").write_text(
        f"""
include "{key}";
options {{
    directory "{work}";
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    pid-file none;
    session-keyfile none;
    recursion no;
    dnssec-validation no;
    notify no;
}};
controls {{ }};
zone "{zone}" {{
    type primary;
    file "{work}/{zone}.zone";
    update-policy {{ grant {KEY_NAME} zonesub ANY; }};
}};
"""
    )
    (work / f"{zone}.zone").write_text(
        f"""$TTL 60
@    IN SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 60
@    IN NS  ns.{zone}.
ns   IN A   127.0.0.1
"""
    )
    process = subprocess.Popen(
        [NAMED, "-g", "-u", "root", "-c", str(work / "named.conf")],
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    server = Bind(process, port, key, [])
    try:
        server.read_until("running")
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
