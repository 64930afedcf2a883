"""Every option of kmsd, once: its command-line flag, environment variable, TOML key, default,
range and unit; and the one typed `Settings` every command is given.

Precedence: command line > environment (KMSD_*) > configuration file > defaults. The
file is `--config PATH`, else $KMSD_CONFIG, else /etc/kmsd/kmsd.toml when it exists. Its
tables are the option groups below ([network], [host], [table], [dns], [logging],
[process]).

This module loads nothing heavy at import (no SQLite, no host, no crypto): `kmsd dns-serve`
reads its options through it too. `build` imports the modules whose settings types it makes.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import shlex
import socket
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

from .addresses import join_host_port, parse_bind_address, parse_ip_port
from .cache import RECORD_LIFETIME
from .eventloop import CHOICES as LOOPS
from .files import read_text
from .privileges import find_user
from .protocol.constants import (
    DEFAULT_ACTIVATION_INTERVAL,
    DEFAULT_RENEWAL_INTERVAL,
    DNS_PORT,
    KMS_PORT,
)
from .protocol.rpc import MAX_FRAG, MUST_RECV_FRAG

if TYPE_CHECKING:
    from .dns.gss import GssCredentials
    from .dns.publish import PublishSettings
    from .host import HostPolicy
    from .limits import Network
    from .server import ServerSettings
    from .store import StoreSettings

DEFAULT_ADMIN_PORT = 9688
DEFAULT_CONFIG = Path("/etc/kmsd/kmsd.toml")
ENV_PREFIX = "KMSD_"
# Variables of kmsd's name that are not options: the configuration file's path, the switch
# to the pure-Python ciphers (kmsd.protocol.crypto), the one that builds the hot path with
# mypyc (setup.py; the tests then expect that build), and the test suite's own two.
NOT_OPTIONS = frozenset(
    {"KMSD_CONFIG", "KMSD_PURE_PYTHON", "KMSD_MYPYC", "KMSD_PRISTINE", "KMSD_CI_CACHE"}
)
MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
MIB = 2**20  # bytes


def default_path() -> Path:
    """$STATE_DIRECTORY (systemd), else $XDG_STATE_HOME or ~/.local/state, /kmsd/kmsd.db."""
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state) / "kmsd.db"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "kmsd" / "kmsd.db"


class ConfigError(Exception):
    """Options that cannot be used; each line names the option, its source and the problem."""


# Parsers: text in, value out, ValueError with a message that stands on its own.


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT, HOST (port 1688) or :PORT (all IPv4 addresses)."""
    return parse_bind_address(text, KMS_PORT)


def show_listen(value: tuple[str, int]) -> str:
    return join_host_port(*value)


def parse_admin(text: str) -> tuple[str, int]:
    """The admin endpoint: HOST:PORT, [IPv6]:PORT, or HOST alone (port 9688)."""
    return parse_bind_address(text, DEFAULT_ADMIN_PORT)


def parse_hwid(text: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != 8:
        raise ValueError(f"{text!r}: HWID must be 16 hex digits")
    return value


def parse_epid_override(text: str) -> tuple[UUID, str]:
    """KMS=EPID, where KMS is a KMS counted ID or the name of a KMS group or SKU."""
    from .protocol.epid import parse_epid  # the product list, loaded only when named
    from .protocol.products import ProductNameError, products

    kms, sep, epid = text.partition("=")
    if not sep:
        raise ValueError(f"{text!r}: expected KMS-ID-OR-NAME=EPID")
    parse_epid(epid)
    try:
        return UUID(kms), epid
    except ValueError:
        pass
    try:
        return products().find_kms_item(kms).id, epid
    except ProductNameError as exc:
        raise ValueError(f"{exc} (a KMS ID, KMS group or product name)") from None


def parse_network(text: str) -> Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an address or network (CIDR)") from None


def parse_zone(text: str) -> str:
    """A DNS name such as lab.test (kept without its final dot)."""
    name = text.strip().rstrip(".").lower()
    labels = name.split(".")
    if not name or any(not 0 < len(label) <= 63 for label in labels) or len(name) > 253:
        raise ValueError(f"{text!r} is not a DNS name")
    return name


def parse_dns_server(text: str) -> tuple[str, int]:
    """IP, IP:PORT, IPv6 or [IPv6]:PORT (port 53)."""
    return parse_ip_port(text, DNS_PORT, "the DNS server")


def parse_address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


def parse_user(text: str) -> str:
    """A user name (or numeric ID) of this system's password database."""
    if find_user(text) is None:
        raise ValueError(f"{text!r}: no such user")
    return text


def number(kind: type[int] | type[float], low: float, high: float) -> Callable[[str], Any]:
    """A whole or real number in [low, high], never NaN or infinite: each option's range
    is what fits where its value goes (a wire field, a timer, a date)."""

    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a{' whole' if kind is int else ''} number") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise ValueError(f"{text!r} must be between {_plain(low)} and {_plain(high)}")
        return value

    return convert


def _plain(value: float) -> str:
    """A bound as people write it: 4294967295, 0.001 (not 4.29497e+09)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false)")


def one_of(*choices: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return convert


@dataclass(frozen=True)
class Target:
    """One domain to publish in, as the operator wrote it (like DnsDomainPublishList)."""

    zone: str
    priority: int  # priority, weight, ttl: the [dns] publish_ options' defaults when unset
    weight: int
    ttl: int
    server: tuple[str, int] | None = None
    host: str | None = None
    address: tuple[str, ...] = ()
    key: str | None = None  # TSIG key file
    keytab: str | None = None  # GSS-TSIG: keytab, principal, ccache, service
    principal: str | None = None
    ccache: str | None = None
    service: str | None = None

    @property
    def gss(self) -> bool:
        return any((self.keytab, self.principal, self.ccache, self.service))

    def text(self) -> str:
        """The one-line form (--publish-target)."""
        parts = [self.zone]
        for name in TARGET_KEYS[1:]:
            value = getattr(self, name)
            if name == "address":
                parts += [f"address={a}" for a in value]
            elif name == "server" and value is not None:
                parts.append(f"server={show_listen(value)}")
            elif value is not None and value != BY_NAME[f"publish_{name}"].default:
                parts.append(f"{name}={value}")
        return " ".join(parts)


TARGET_KEYS = (
    "zone", "server", "host", "address", "priority", "weight", "ttl",
    "key", "keytab", "principal", "ccache", "service",
)  # fmt: skip
TARGET_DEFAULTED = ("priority", "weight", "ttl")


def target_from_table(table: Mapping[str, Any]) -> Target:
    """A [[dns.publish_target]] table; ValueError naming what is wrong."""
    unknown = sorted(set(table) - set(TARGET_KEYS))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(TARGET_KEYS)})")
    if "zone" not in table:
        raise ValueError("a target needs a zone")
    # Each key is read as the [dns] option of its name (publish_KEY) is, with its default.
    fields: dict[str, Any] = {n: BY_NAME[f"publish_{n}"].default for n in TARGET_DEFAULTED}
    for name, raw in table.items():
        option = BY_NAME[f"publish_{name}"]
        if option.repeat:
            items = raw if isinstance(raw, list) else [raw]
            fields[name] = tuple(option.parse(str(a)) for a in items)
        else:
            fields[name] = option.parse(str(raw))
    target = Target(**fields)
    if target.key is not None and target.gss:
        raise ValueError(
            f"{target.zone}: key (TSIG) and keytab/principal/ccache/service (GSS-TSIG) "
            "exclude each other"
        )
    return target


def parse_target(text: str) -> Target:
    """'ZONE key=value ...' (address may repeat)."""
    zone, *pairs = text.split() or [""]
    table: dict[str, Any] = {"zone": zone}
    addresses = []
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"{pair!r} is not key=value")
        if name == "address":
            addresses.append(value)
        elif name in table:
            raise ValueError(f"{name} given twice")
        else:
            table[name] = value
    if addresses:
        table["address"] = addresses
    return target_from_table(table)


@dataclass(frozen=True)
class Option:
    name: str  # attribute, TOML key (in its section) and, upper-cased, the KMSD_ variable
    section: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    metavar: str | None = None
    repeat: bool = False  # a list: repeatable flag, TOML array, comma-separated variable
    flag: bool = False  # a boolean switch; a default-true one is turned off by --no-NAME
    reload: bool = False  # SIGHUP applies a change without a restart
    show: Callable[[Any], str] = str
    unit: float = 1.0  # seconds per unit of a time given in minutes, hours or days; bytes per MiB
    table: Callable[[Mapping[str, Any]], Any] | None = None  # parses a TOML table item

    @property
    def cli(self) -> str:
        dashed = self.name.replace("_", "-")
        return f"--no-{dashed}" if self.flag and self.default else f"--{dashed}"

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"


def _hex(value: bytes) -> str:
    return value.hex().upper()


def _epid_show(value: tuple[UUID, str]) -> str:
    return f"{value[0]}={value[1]}"


UINT32_MAX = 0xFFFFFFFF  # counts and intervals travel in 32-bit unsigned fields
COUNT_MAX = 0x7FFFFFFF  # table size and precharge: their sum still fits the count field
CONNECTIONS_MAX = 1_000_000  # more than any system's file descriptors
SECONDS_MAX = 7 * DAY  # timeouts and re-publication intervals
DAYS_MAX = 36500.0  # lifetimes, history and clock skew: under a century

OPTIONS: tuple[Option, ...] = (
    Option(
        "listen",
        "network",
        parse_listen,
        [("0.0.0.0", KMS_PORT), ("::", KMS_PORT)],
        "address to listen on; repeat for several; [IPv6]:PORT for IPv6",
        "HOST:PORT",
        repeat=True,
        show=show_listen,
    ),
    Option(
        "idle_timeout",
        "network",
        number(float, 0.001, SECONDS_MAX),
        30.0,
        "close a connection after this many seconds without data",
        "SECONDS",
    ),
    Option(
        "read_timeout",
        "network",
        number(float, 0.001, SECONDS_MAX),
        10.0,
        "close a connection whose PDU is still incomplete after this many seconds (slow senders)",
        "SECONDS",
    ),
    Option(
        "max_connections",
        "network",
        number(int, 1, CONNECTIONS_MAX),
        1000,
        "connections served at once; when all are taken, the address holding the most "
        "gives one up for a newcomer (its oldest without a request, else its idle longest)",
        "N",
    ),
    Option(
        "max_connections_per_ip",
        "network",
        number(int, 1, CONNECTIONS_MAX),
        64,
        "connections served at once from one address (an IPv6 /64 counts as one); more are refused",
        "N",
    ),
    Option(
        "rate_per_ip",
        "network",
        number(float, 0, 1e9),
        0.0,
        "activation requests per second from one address (bursts of twice that); more "
        "get an RPC 'server too busy' fault; 0: unlimited",
        "PER_SECOND",
    ),
    Option(
        "max_pdu",
        "network",
        number(int, MUST_RECV_FRAG, 65535),
        MAX_FRAG,
        "largest RPC fragment accepted, in bytes (1432-65535)",
        "BYTES",
    ),
    Option(
        "allow",
        "network",
        parse_network,
        [],
        "serve only clients from this network (CIDR); repeatable; default: everyone",
        "CIDR",
        repeat=True,
    ),
    Option(
        "admin",
        "network",
        parse_admin,
        None,
        "serve the admin endpoint (Prometheus /metrics, /healthz, /readyz, JSON API, status "
        "page) over HTTP on this address, e.g. 127.0.0.1:9688; reading needs no "
        "authentication, so keep it on loopback or a management network (changes need the "
        "token of --admin-token-file); default: off",
        "HOST:PORT",
        show=show_listen,
    ),
    Option(
        "admin_token_file",
        "network",
        str,
        None,
        "enable the admin endpoint's changes (behaviour rules and the clock of kmsd as a "
        "test double: POST/DELETE /api/rules, POST /api/clock) for requests that carry the "
        "token in this file (Authorization: Bearer TOKEN); default: changes are refused",
        "PATH",
    ),
    Option(
        "ndr64",
        "network",
        parse_bool,
        True,
        "refuse NDR64 and answer in NDR32 only, like a pre-Windows 8 host",
        flag=True,
    ),
    Option("btfn", "network", parse_bool, True, "refuse bind-time feature negotiation", flag=True),
    Option(
        "loop",
        "network",
        one_of(*LOOPS),
        "auto",
        "event loop: uvloop (faster; pip install 'kmsd[fast]'), asyncio's own, or auto: uvloop "
        "when installed",
        "{auto,uvloop,asyncio}",
    ),
    Option(
        "activation_interval",
        "host",
        number(int, 1, UINT32_MAX),
        DEFAULT_ACTIVATION_INTERVAL,
        "minutes an unactivated client waits before it retries",
        "MINUTES",
        reload=True,
    ),
    Option(
        "renewal_interval",
        "host",
        number(int, 1, UINT32_MAX),
        DEFAULT_RENEWAL_INTERVAL,
        "minutes between renewals of an activated client",
        "MINUTES",
        reload=True,
    ),
    Option(
        "hwid",
        "host",
        parse_hwid,
        None,
        "host hardware ID sent in V6 replies (default: random at first start, then kept)",
        "HEX16",
        show=_hex,
    ),
    Option(
        "epid",
        "host",
        parse_epid_override,
        [],
        "fixed ePID for a KMS counted ID (GUID) or a KMS group or SKU name; repeatable "
        "(default: generated per host key at first start, then kept)",
        "KMS=EPID",
        repeat=True,
        reload=True,
        show=_epid_show,
    ),
    Option(
        "strict",
        "host",
        parse_bool,
        False,
        "refuse unknown, retail and preview products and App/KMS ID mismatches with "
        "0xC004F042, as a real host would",
        flag=True,
        reload=True,
    ),
    Option(
        "max_clock_skew",
        "host",
        number(float, 0.001, DAYS_MAX * 24),
        None,
        "refuse requests whose time is further off than this many hours with 0xC004F06C "
        "(a real host allows 4); default: accept any time",
        "HOURS",
        reload=True,
        unit=HOUR,
    ),
    Option(
        "verify",
        "host",
        parse_bool,
        True,
        "accept requests with a bad V4 MAC or bad V5/V6 padding",
        flag=True,
        reload=True,
    ),
    Option(
        "clock_file",
        "host",
        str,
        None,
        "tests and simulations only: take the time from this file (a Unix time, which "
        "kmsclient simulate rewrites) instead of the system clock",
        "PATH",
    ),
    Option(
        "journal_size",
        "host",
        number(int, 0, 1_000_000),
        10_000,
        "exchanges the request journal keeps (read at /api/journal, kmsd journal); 0: none",
        "N",
    ),
    Option(
        "rule",
        "host",
        lambda text: rule_from_text(text),
        [],
        "a behaviour rule, for kmsd as a test double (repeatable; in the file: [[rule]] "
        "tables): 'KEY=VALUE ...', e.g. 'product=\"Windows 10/11 Enterprise\" "
        "hresult=KMS_ID_MISMATCH times=1' (the keys: README, kmsd as a test double)",
        "RULE",
        repeat=True,
        reload=True,
        show=lambda spec: rule_text(spec),
        table=lambda table: rule_from_table(table),
    ),
    Option(
        "db",
        "table",
        str,
        str(default_path()),
        "SQLite database of the client table and the host's identity; :memory: for a throwaway run",
        "PATH",
    ),
    Option(
        "history_days",
        "table",
        number(float, 0, DAYS_MAX),
        180.0,
        "days kmsd keeps the last request of a client that is no longer in the table "
        "(kmsd clients shows the table; 0 keeps them for ever)",
        "DAYS",
        unit=DAY,
    ),
    Option(
        "synchronous",
        "table",
        one_of("normal", "full"),
        "normal",
        "normal: a reply waits until its record is committed to the write-ahead log, so it "
        "survives any crash or kill of kmsd; full: also until the log is flushed to disk "
        "(fdatasync, in a thread), so it survives power loss, for about 0.2 ms more CPU "
        "per activation",
        "{normal,full}",
    ),
    Option(
        "wal_limit",
        "table",
        number(int, 1, 2**20),
        64,
        "MiB the database's write-ahead log may grow to; then commits wait while it is "
        "copied into the database and emptied",
        "MIB",
        unit=MIB,
    ),
    Option(
        "precharge",
        "table",
        number(int, 0, COUNT_MAX),
        0,
        "lab override: report N more clients than counted, so that the first client "
        "already meets its threshold (24 for Windows clients)",
        "N",
        reload=True,
    ),
    Option(
        "fixed_count",
        "table",
        number(int, 0, UINT32_MAX),
        None,
        "lab override: report this count to every client",
        "N",
        reload=True,
    ),
    Option(
        "capacity",
        "table",
        number(int, 1, COUNT_MAX),
        None,
        "lab override: a fixed table size instead of 2 x the highest threshold seen",
        "N",
    ),
    Option(
        "record_lifetime",
        "table",
        number(float, 0.001, DAYS_MAX),
        RECORD_LIFETIME / DAY,
        "lab override: days a client's record counts (a real host: 30)",
        "DAYS",
        unit=DAY,
    ),
    Option(
        "publish_zone",
        "dns",
        parse_zone,
        None,
        "publish this host as _vlmcs._tcp SRV and A/AAAA records in this zone by DNS "
        "dynamic update (RFC 2136); default: do not publish",
        "ZONE",
    ),
    Option(
        "publish_server",
        "dns",
        parse_dns_server,
        None,
        "the zone's primary DNS server that takes the updates (default: the zone's SOA MNAME)",
        "IP[:PORT]",
        show=show_listen,
    ),
    Option(
        "publish_key",
        "dns",
        str,
        None,
        "TSIG key for the updates, a file in BIND's key format (tsig-keygen); default: "
        "unsigned updates",
        "FILE",
    ),
    Option(
        "publish_keytab",
        "dns",
        str,
        None,
        "sign the updates with GSS-TSIG (Active Directory's secure updates) as "
        "--publish-principal, with keys from this keytab (kmsd gets and renews its tickets)",
        "FILE",
    ),
    Option(
        "publish_principal",
        "dns",
        str,
        None,
        "GSS-TSIG: the Kerberos principal kmsd updates as, e.g. KMS1$@CORP.EXAMPLE (without "
        "--publish-keytab: tickets from the credential cache)",
        "PRINCIPAL",
    ),
    Option(
        "publish_ccache",
        "dns",
        str,
        None,
        "GSS-TSIG: the Kerberos credential cache to use (default: KRB5CCNAME's, or kmsd's "
        "own in memory with --publish-keytab)",
        "CCACHE",
    ),
    Option(
        "publish_service",
        "dns",
        str,
        None,
        "GSS-TSIG: the DNS server's principal, DNS@HOST or DNS/HOST@REALM (default: DNS@ "
        "the zone's SOA MNAME)",
        "PRINCIPAL",
    ),
    Option(
        "publish_host",
        "dns",
        parse_zone,
        None,
        "the host name the SRV record points to (default: this host's short name in the zone); "
        "its A/AAAA records are published when it lies inside the zone",
        "NAME",
    ),
    Option(
        "publish_address",
        "dns",
        parse_address,
        [],
        "address to publish for the host name; repeatable (default: the addresses kmsd listens "
        "on; for 0.0.0.0 or ::, the one this host reaches the DNS server from)",
        "IP",
        repeat=True,
    ),
    Option(
        "publish_priority",
        "dns",
        number(int, 0, 65535),
        0,
        "SRV priority: clients try lower numbers first",
        "N",
        reload=True,
    ),
    Option(
        "publish_weight",
        "dns",
        number(int, 0, 65535),
        0,
        "SRV weight: share of clients among hosts of the same priority",
        "N",
        reload=True,
    ),
    Option(
        "publish_ttl",
        "dns",
        number(int, 0, 2147483647),
        600,
        "TTL of the published records, in seconds",
        "SECONDS",
        reload=True,
    ),
    Option(
        "publish_interval",
        "dns",
        number(float, 1, SECONDS_MAX),
        3600.0,
        "seconds between re-publications (the addresses are checked every minute, and "
        "published at once when they change)",
        "SECONDS",
        reload=True,
    ),
    Option(
        "publish_target",
        "dns",
        lambda text: parse_target(text),
        [],
        "another domain to publish in (repeatable; in the file: [[dns.publish_target]] "
        "tables): 'ZONE key=value ...', keys server, host, address, priority, weight, ttl, "
        "key (TSIG), keytab, principal, ccache, service (GSS-TSIG)",
        "TARGET",
        repeat=True,
        reload=True,
        show=lambda target: target.text(),
        table=lambda table: target_from_table(table),
    ),
    Option(
        "log_format",
        "logging",
        one_of("console", "json"),
        "console",
        "human-readable lines, or one JSON object per line",
        "{console,json}",
    ),
    Option(
        "log_level",
        "logging",
        one_of("debug", "info", "warning", "error"),
        "info",
        "the least important messages shown",
        "{debug,info,warning,error}",
        reload=True,
    ),
    Option(
        "user",
        "process",
        parse_user,
        None,
        "when started as root (port 1688 needs no privilege; root is needed only for a port "
        "below 1024): run as this user once the sockets are bound and the database is open; "
        "kmsd refuses to start when it does not exist",
        "NAME",
    ),
)
BY_NAME = {o.name: o for o in OPTIONS}
SECTIONS = tuple(dict.fromkeys(o.section for o in OPTIONS))


# The typed settings: what the options mean to the parts of kmsd, in their units (seconds).


@dataclass(frozen=True)
class HostSettings:
    policy: HostPolicy
    hwid: bytes | None  # the operator's; None: the one kept in the database
    epids: tuple[tuple[UUID, str], ...]  # KMS counted ID -> ePID the operator fixed
    clock_file: Path | None  # tests and simulations: the time comes from this file
    rules: tuple[dict[str, Any], ...]  # behaviour rules (kmsd.rules keys, canonical)
    journal_size: int


@dataclass(frozen=True)
class LogSettings:
    format: str  # console or json
    level: str


@dataclass(frozen=True)
class ProcessSettings:
    user: str | None  # run as this user once bound (started as root)
    loop: str  # event loop: auto, uvloop or asyncio


@dataclass(frozen=True)
class Settings:
    """Everything kmsd is told, resolved and checked once, typed and in seconds."""

    network: ServerSettings
    admin: tuple[str, int] | None  # the admin endpoint's address; None: off
    admin_token: str | None  # what its changing requests must carry; None: they are off
    host: HostSettings
    table: StoreSettings
    dns: tuple[PublishSettings, ...]  # the publication targets; empty: none
    logging: LogSettings
    process: ProcessSettings


@dataclass
class Effective:
    """The options in force (in the units people write), and where each value came from."""

    values: dict[str, Any]
    sources: dict[str, str]
    config_file: Path | None

    def value(self, name: str) -> Any:
        """An option's value in seconds when it is a time, in bytes when a size (None
        stays None)."""
        option = BY_NAME[name]
        value = self.values[name]
        return value if value is None or option.unit == 1.0 else value * option.unit


def log_settings(effective: Effective) -> LogSettings:
    return LogSettings(effective.value("log_format"), effective.value("log_level"))


def build(effective: Effective) -> Settings:
    """The typed settings of `effective`; ConfigError when a file it names is unusable."""
    from .host import HostPolicy
    from .server import ServerSettings
    from .store import StoreSettings

    v = effective.value
    listen = tuple(v("listen"))
    if effective.sources["listen"] == "default" and not _ipv6_available():
        listen = listen[:1]
    return Settings(
        network=ServerSettings(
            listen=listen,
            idle_timeout=v("idle_timeout"),
            read_timeout=v("read_timeout"),
            max_connections=v("max_connections"),
            max_connections_per_ip=v("max_connections_per_ip"),
            allow=tuple(v("allow")),
            rate_per_ip=v("rate_per_ip"),
            max_pdu=v("max_pdu"),
            ndr64=v("ndr64"),
            btfn=v("btfn"),
        ),
        admin=v("admin"),
        admin_token=_admin_token(effective),
        host=HostSettings(
            policy=HostPolicy(
                activation_interval=v("activation_interval"),
                renewal_interval=v("renewal_interval"),
                strict=v("strict"),
                verify=v("verify"),
                max_clock_skew=v("max_clock_skew"),
                fixed_count=v("fixed_count"),
                precharge=v("precharge"),
            ),
            hwid=v("hwid"),
            epids=tuple(v("epid")),
            clock_file=Path(v("clock_file")) if v("clock_file") else None,
            rules=tuple(v("rule")),
            journal_size=v("journal_size"),
        ),
        table=StoreSettings(
            path=v("db"),
            lifetime=v("record_lifetime"),
            history=v("history_days") or None,
            synchronous=v("synchronous"),
            capacity=v("capacity"),
            create_directory=v("db") == str(default_path()),
            wal_limit=v("wal_limit"),
        ),
        dns=_publish_settings(effective),
        logging=log_settings(effective),
        process=ProcessSettings(user=v("user"), loop=v("loop")),
    )


def _admin_token(effective: Effective) -> str | None:
    path = effective.value("admin_token_file")
    if path is None:
        return None
    if effective.value("admin") is None:
        raise ConfigError("admin_token_file: the admin endpoint is off (set admin as well)")
    try:
        token = read_text(Path(path)).strip()
    except OSError as exc:
        raise ConfigError(f"admin_token_file: {path}: cannot read: {exc.strerror}") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ConfigError(
            f"admin_token_file: {path}: expected one token of at least 16 characters "
            "without spaces (e.g. from: openssl rand -hex 32)"
        )
    return token


def rule_from_table(table: Mapping[str, Any]) -> dict[str, Any]:
    """A [[rule]] table, checked (kmsd.rules) and in canonical form; ValueError says why."""
    from .rules import parse_rule

    return parse_rule(table, origin="config").spec


def rule_from_text(text: str) -> dict[str, Any]:
    """A rule as 'KEY=VALUE ...' (shell quoting); the values of the keys that take numbers
    or true are typed, the others stay text (a workstation may be called 42)."""
    from .rules import FLAG_KEYS, NUMBER_KEYS

    table: dict[str, Any] = {}
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    for word in words:
        key, sep, raw = word.partition("=")
        if not sep:
            raise ValueError(f"{word!r}: expected KEY=VALUE")
        value: Any = raw
        if key in FLAG_KEYS and raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        elif key in NUMBER_KEYS:
            for kind in (int, float):
                try:
                    value = kind(raw)
                    break
                except ValueError:
                    pass
        table[key] = value
    return rule_from_table(table)


def rule_text(spec: Mapping[str, Any]) -> str:
    """The one-line form of a rule (--rule, check-config)."""
    words = []
    for key, value in spec.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        words.append(f"{key}={shlex.quote(text)}")
    return " ".join(words)


def _targets(effective: Effective) -> list[Target]:
    """The domains to publish in: the short form ([dns] publish_zone ...) first."""
    v = effective.value
    targets = list(v("publish_target"))
    zone = v("publish_zone")
    if zone is not None:
        short = Target(
            zone=zone,
            server=v("publish_server"),
            host=v("publish_host"),
            address=tuple(v("publish_address")),
            priority=v("publish_priority"),
            weight=v("publish_weight"),
            ttl=v("publish_ttl"),
            key=v("publish_key"),
            keytab=v("publish_keytab"),
            principal=v("publish_principal"),
            ccache=v("publish_ccache"),
            service=v("publish_service"),
        )
        if short.key is not None and short.gss:
            raise ConfigError(
                "dns.publish_key (TSIG) and dns.publish_keytab/principal/ccache/service "
                "(GSS-TSIG) exclude each other"
            )
        targets.insert(0, short)
    seen = [t.zone for t in targets]
    twice = sorted({z for z in seen if seen.count(z) > 1})
    if twice:
        raise ConfigError(f"dns: {', '.join(twice)}: more than one publication target")
    return targets


def _publish_settings(effective: Effective) -> tuple[PublishSettings, ...]:
    targets = _targets(effective)
    if not targets:
        return ()
    from .dns import publish  # dnspython is loaded only by a kmsd that publishes

    short_host = socket.gethostname().split(".")[0]
    short_form = effective.value("publish_zone") is not None
    result = []
    for i, t in enumerate(targets):
        try:
            result.append(
                publish.make_settings(
                    zone=t.zone,
                    host=t.host or f"{short_host}.{t.zone}",
                    server=t.server,
                    key=Path(t.key) if t.key else None,
                    gss=_gss(t),
                    addresses=t.address,
                    priority=t.priority,
                    weight=t.weight,
                    ttl=t.ttl,
                    interval=effective.value("publish_interval"),
                )
            )
        except ValueError as exc:
            if i == 0 and short_form:
                where = BY_NAME["publish_key" if t.key else "publish_keytab"].key
            else:
                where = f"{BY_NAME['publish_target'].key} {t.zone}"
            raise ConfigError(f"{where}: {exc}") from None
    return tuple(result)


def _gss(target: Target) -> GssCredentials | None:
    """GSS-TSIG credentials, the keytab checked (locally) and the binding present."""
    if not target.gss:
        return None
    import importlib.util

    from .dns.gss import GssCredentials, check_keytab

    if importlib.util.find_spec("gssapi") is None:
        raise ValueError("GSS-TSIG needs the python gssapi binding: pip install 'kmsd[gss]'")
    keytab = Path(target.keytab) if target.keytab else None
    if keytab is not None:
        check_keytab(keytab, target.principal)
    return GssCredentials(target.principal, keytab, target.ccache, target.service)


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM):
            return True
    except OSError:
        return False


def _argparse_type(option: Option) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return option.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def add_options(parser: argparse.ArgumentParser, names: Collection[str] | None = None) -> None:
    """Add --config and the options (all, or those `names`) to `parser`; unset options stay
    absent from the namespace."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"TOML configuration file (default: $KMSD_CONFIG, else "
        f"{DEFAULT_CONFIG} when it exists)",
    )
    chosen = [o for o in OPTIONS if names is None or o.name in names]
    groups = {s: parser.add_argument_group(s) for s in dict.fromkeys(o.section for o in chosen)}
    for option in chosen:
        default = option.default
        if option.repeat:
            shown = ", ".join(option.show(v) for v in default) if default else None
        else:
            shown = None if default is None or option.flag else option.show(default)
        help_text = option.help + (f" (default: {shown})" if shown else "")
        help_text += f" [{option.env}{', comma-separated' if option.repeat else ''}]"
        if option.flag:
            groups[option.section].add_argument(
                option.cli,
                dest=option.name,
                default=argparse.SUPPRESS,
                action="store_false" if option.default else "store_true",
                help=help_text,
            )
        else:
            groups[option.section].add_argument(
                option.cli,
                dest=option.name,
                default=argparse.SUPPRESS,
                metavar=option.metavar,
                type=_argparse_type(option),
                action="append" if option.repeat else "store",
                help=help_text,
            )


def _from_text(option: Option, text: str) -> Any:
    if option.repeat:
        return [option.parse(part.strip()) for part in text.split(",") if part.strip()]
    return option.parse(text)


def _from_toml(option: Option, value: object) -> Any:
    if option.repeat:
        if not isinstance(value, list):
            raise ValueError(f"expected an array, got {type(value).__name__}")
        if option.table is not None:
            return [option.table(v) if isinstance(v, dict) else option.parse(str(v)) for v in value]
        return [option.parse(str(v)) for v in value]
    if option.flag:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if isinstance(value, dict | list):
        raise ValueError(f"expected a single value, got {type(value).__name__}")
    return option.parse(str(value))


def read_file(path: Path) -> dict[str, Any]:
    """The options of a TOML file; ConfigError lists every problem, by key."""
    import tomllib  # here: a daemon started without a file never needs its 1.4 MiB

    try:
        data = tomllib.loads(read_text(path))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    problems = []
    if isinstance(data.get("rule"), list):  # [[rule]] tables: host.rule, at the top level
        data.setdefault("host", {}).setdefault("rule", []).extend(data.pop("rule"))
    for section, table in data.items():
        if section not in SECTIONS or not isinstance(table, dict):
            problems.append(f"{path}: [{section}]: unknown table (known: {', '.join(SECTIONS)})")
            continue
        for key, raw in table.items():
            option = BY_NAME.get(key)
            if option is None or option.section != section:
                hint = f" (did you mean {BY_NAME[key].key}?)" if key in BY_NAME else ""
                problems.append(f"{path}: {section}.{key}: unknown option{hint}")
                continue
            try:
                values[key] = _from_toml(option, raw)
            except ValueError as exc:
                problems.append(f"{path}: {option.key}: {exc}")
    if problems:
        raise ConfigError("\n".join(problems))
    return values


def read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    problems = []
    by_env = {o.env: o for o in OPTIONS}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NOT_OPTIONS:
            continue
        option = by_env.get(name)
        if option is None:
            problems.append(f"environment {name}: unknown option")
            continue
        try:
            values[option.name] = _from_text(option, text)
        except ValueError as exc:
            hint = " (a list is comma-separated here)" if option.repeat else ""
            problems.append(f"environment {name}: {exc}{hint}")
    if problems:
        raise ConfigError("\n".join(problems))
    return values


def resolve(cli: dict[str, Any], environ: Mapping[str, str] = os.environ) -> Effective:
    """Merge defaults, file, environment and command line (`cli`: only what was given)."""
    cli = dict(cli)
    given = cli.pop("config", None) or environ.get("KMSD_CONFIG")
    config_file = Path(given) if given else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    values = {o.name: o.default for o in OPTIONS}
    sources = dict.fromkeys(values, "default")
    layers = [
        (str(config_file), read_file(config_file) if config_file else {}),
        ("environment", read_environment(environ)),
        ("command line", cli),
    ]
    for source, layer in layers:
        for name, value in layer.items():
            values[name] = value
            sources[name] = source
    return Effective(values, sources, config_file)


def load(
    cli: dict[str, Any], environ: Mapping[str, str] = os.environ
) -> tuple[Effective, Settings]:
    """The configuration every command runs with: resolved, checked and typed."""
    effective = resolve(cli, environ)
    return effective, build(effective)


def defaults(**values: Any) -> Settings:
    """The settings of the option table alone (no file, no environment) but for `values`
    (option name: value as parsed), for tests and tools."""
    given = {o.name: o.default for o in OPTIONS} | values
    sources = {name: "given" if name in values else "default" for name in given}
    return build(Effective(given, sources, None))


def render(effective: Effective) -> str:
    """The effective configuration as a TOML file, each value's source in a comment."""
    lines = [f"# effective kmsd configuration (file: {effective.config_file or 'none'})"]
    for section in SECTIONS:
        lines.append(f"\n[{section}]")
        for option in (o for o in OPTIONS if o.section == section):
            value = effective.values[option.name]
            source = effective.sources[option.name]
            if value is None:
                lines.append(f"# {option.name} is not set  # {source}")
                continue
            lines.append(f"{option.name} = {_toml(option, value)}  # {source}")
    return "\n".join(lines) + "\n"


def _toml(option: Option, value: Any) -> str:
    if option.repeat:
        return "[" + ", ".join(_quote(option.show(v)) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return _quote(option.show(value))


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
