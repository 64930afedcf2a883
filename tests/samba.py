"""A Samba Active Directory domain controller for tests: provisioned offline in a temporary
directory, serving its internal DNS and its KDC on one loopback address, on free ports.

Only the DNS server and the KDC run (no file service, LDAP or RPC): enough for secure
(GSS-TSIG) dynamic updates, the AD default for a domain's zone. Accounts, groups and rights
are made with samba-tool directly on the directory's database.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.query

from .bind import dig

REALM = "LAB.TEST"
DOMAIN = "lab.test"
ADDRESS = "127.0.88.1"  # no other test uses it; Samba needs it on no interface
ADMIN_PASSWORD = "Lab-admin-1"
SAMBA = shutil.which("samba") or "/usr/sbin/samba"
SAMBA_TOOL = shutil.which("samba-tool") or "/usr/bin/samba-tool"
# The DC's DNS server and KDC only: no file service, LDAP, RPC, replication or time service.
SERVICES = "-s3fs -nbt -wrepl -ntp_signd -winbindd -dnsupdate -ldap -cldap -drepl -kcc -rpc"
MAX_RUNTIME = 1800  # Samba stops itself after this many seconds should the tests die


# Runs samba-tool's commands one after the other in one interpreter.
_BATCH = """
import json, sys
from samba.netcmd.main import cmd_sambatool
for argv in json.loads(sys.argv[1]):
    tool = cmd_sambatool()
    try:
        status = tool._run("samba-tool", *argv)
    except Exception as exc:
        tool.show_command_error(exc)
        status = 1
    if status:
        sys.exit(f"samba-tool {' '.join(argv)}: exit status {status}")
"""


def _samba_python() -> str:
    """The interpreter samba-tool runs with (Samba's modules are installed for it)."""
    with open(SAMBA_TOOL) as script:
        first = script.readline()
    return first[2:].strip() if first.startswith("#!") else "/usr/bin/python3"


def installed() -> bool:
    return all(shutil.which(p) for p in (SAMBA, SAMBA_TOOL, "kinit", "klist", "dig"))


def free_ports(count: int) -> list[int]:
    """Ports free for UDP and TCP on ADDRESS."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((ADDRESS, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((ADDRESS, port))
                except OSError:
                    continue
            if port not in ports:
                ports.append(port)
    return ports


@dataclass
class Samba:
    directory: Path
    dns_port: int
    kdc_port: int
    process: subprocess.Popen[bytes] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def smb_conf(self) -> Path:
        return self.directory / "etc" / "smb.conf"

    @property
    def krb5_conf(self) -> Path:
        return self.directory / "krb5.conf"

    @property
    def nameserver(self) -> str:
        return f"{ADDRESS}:{self.dns_port}"

    @property
    def server(self) -> tuple[str, int]:
        return (ADDRESS, self.dns_port)

    def tool(self, *commands: Sequence[str]) -> str:
        """samba-tool commands on this domain's database, in one process (samba-tool takes
        a second to start); their output."""
        argv = [[*c, "-s", str(self.smb_conf)] for c in commands]
        result = subprocess.run(
            [_samba_python(), "-c", _BATCH, json.dumps(argv)],
            capture_output=True,
            text=True,
            timeout=300,
            env=self.env(),
        )
        if result.returncode != 0:
            raise RuntimeError(f"samba-tool: {result.stderr or result.stdout}")
        return result.stdout

    def env(self) -> dict[str, str]:
        return {**os.environ, "KRB5_CONFIG": str(self.krb5_conf)}

    def machine_accounts(self, *names: str) -> dict[str, Path]:
        """Computer accounts NAME$, each with a keytab holding its keys."""
        keytabs = {name: self.directory / f"{name.lower()}.keytab" for name in names}
        commands = []
        for name, keytab in keytabs.items():
            password = f"--newpassword={os.urandom(12).hex()}Aa1!"
            commands += [
                ["computer", "create", name],
                ["user", "setpassword", f"{name}$", password],
                ["domain", "exportkeytab", str(keytab), f"--principal={name}$"],
            ]
        self.tool(*commands)
        return keytabs

    def group(self, name: str, *members: str) -> str:
        """A security group with these members; its SID."""
        out = self.tool(
            ["group", "add", name],
            ["group", "addmembers", name, ",".join(members)],
            ["group", "show", name, "--attributes=objectSid"],
        )
        for line in out.splitlines():
            if line.startswith("objectSid:"):
                return line.split(":", 1)[1].strip()
        raise RuntimeError(f"group {name} has no objectSid")

    def grant_full_control(self, name: str, sid: str) -> None:
        """Full control for `sid` over the DNS name `name` of the domain's zone."""
        dc = ",".join(f"DC={part}" for part in DOMAIN.split("."))
        node = f"DC={name},DC={DOMAIN},CN=MicrosoftDNS,DC=DomainDnsZones,{dc}"
        sddl = f"--sddl=(A;;RPWPCRCCDCLCLORCWOWDSDDTSW;;;{sid})"
        self.tool(["dsacl", "set", f"--objectdn={node}", sddl])

    def dig(self, name: str, rdtype: str) -> list[str]:
        return dig(ADDRESS, self.dns_port, name, rdtype)

    def log_text(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.directory.glob("log.*"))
        )


def _write_config(samba: Samba) -> None:
    d = samba.directory
    # Provisioning wrote a full smb.conf; the DC runs with only what it needs, under `d`.
    samba.smb_conf.write_text(
        f"""[global]
    netbios name = DC1
    realm = {REALM}
    workgroup = LAB
    server role = active directory domain controller
    interfaces = {ADDRESS}/8
    bind interfaces only = yes
    dns port = {samba.dns_port}
    krb5 port = {samba.kdc_port}
    kpasswd port = {free_ports(1)[0]}
    dns forwarder =
    disable netbios = yes
    server services = {SERVICES}
    dns update command = /bin/true
    prefork children = 1
    private dir = {d}/private
    state directory = {d}/state
    cache directory = {d}/cache
    lock directory = {d}
    pid directory = {d}
    binddns dir = {d}/bind-dns
    ncalrpc dir = {d}/ncalrpc
    log file = {d}/log.%m
    logging = file
    log level = 1 dns:3 auth:2
"""
    )
    # Kerberos clients find the KDC here, never through the host's DNS.
    samba.krb5_conf.write_text(
        f"""[libdefaults]
    default_realm = {REALM}
    dns_lookup_kdc = false
    dns_lookup_realm = false
    rdns = false
    dns_canonicalize_hostname = false
[realms]
    {REALM} = {{
        kdc = {ADDRESS}:{samba.kdc_port}
    }}
[domain_realm]
    {DOMAIN} = {REALM}
    .{DOMAIN} = {REALM}
"""
    )


def _ready(samba: Samba) -> bool:
    query = dns.message.make_query(DOMAIN, "SOA")
    try:
        answer = dns.query.tcp(query, ADDRESS, port=samba.dns_port, timeout=1)
    except (OSError, EOFError, dns.exception.DNSException):
        return False
    return bool(answer.answer)


def start(directory: Path) -> Samba:
    """Provision the domain and start its DC; stop() it when done."""
    dns_port, kdc_port = free_ports(2)
    samba = Samba(directory, dns_port, kdc_port)
    began = time.monotonic()
    subprocess.run(
        [
            SAMBA_TOOL,
            "domain",
            "provision",
            f"--targetdir={directory}",
            f"--realm={REALM}",
            "--domain=LAB",
            "--server-role=dc",
            "--dns-backend=SAMBA_INTERNAL",
            "--host-name=dc1",
            f"--host-ip={ADDRESS}",
            f"--adminpass={ADMIN_PASSWORD}",
            "--option=dns forwarder =",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    samba.timings["provision"] = time.monotonic() - began
    _write_config(samba)
    began = time.monotonic()
    samba.process = subprocess.Popen(
        [
            SAMBA,
            "--foreground",
            "--no-process-group",
            "-s",
            str(samba.smb_conf),
            f"--maximum-runtime={MAX_RUNTIME}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=samba.env(),
        start_new_session=True,  # its worker processes share its process group, to end them
    )
    deadline = time.monotonic() + 60
    while not _ready(samba):  # polled: Samba tells nothing when its DNS server is up
        if samba.process.poll() is not None or time.monotonic() > deadline:
            stop(samba)
            raise RuntimeError(f"samba did not start:\n{samba.log_text()[-3000:]}")
        time.sleep(0.1)
    samba.timings["start"] = time.monotonic() - began
    return samba


def stop(samba: Samba) -> None:
    """End the DC and every process it forked."""
    process = samba.process
    if process is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # workers that outlived their parent


def running(directory: Path) -> Iterator[Samba]:
    samba = start(directory)
    try:
        yield samba
    finally:
        stop(samba)
