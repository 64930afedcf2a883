"""Behaviour rules: what the host answers to chosen requests, for tests of activation tooling.

A rule is a match and a response. Rules are tried in the order they were added, those of the
configuration file last (the baseline a test's own rules override); the first one that
matches a request and has not expired decides the answer. A rule may hold for its
next `times` matches or for `seconds` of the host's clock (which may be virtual), then it
goes. Without rules the host answers as a real one does.

One model, three ways in: `[[rule]]` tables of the configuration file, JSON objects posted
to the admin endpoint (/api/rules) and keyword arguments in Python (kmsd.testing). All go
through `parse_rule`, whose keys are:

match (all given must hold; none: every request)
    application   application name ("Windows", "Office 2013 and later") or GUID
    kms_id        KMS counted ID: product group name ("Windows 10/11") or GUID
    product       SKU: product name as kmsclient --product takes it, or SKU ID
    cmid          client machine ID
    workstation   glob on the workstation name, case-insensitive ("lab-*")
    protocol      protocol major version: 4, 5 or 6 ("6.0" is accepted)
    client        client address or network ("127.0.0.1", "10.0.0.0/8")
response (at most one of hresult, fault, bind_nak, close; none: a reply with a count)
    hresult       refuse with this HRESULT (name such as "KMS_ID_MISMATCH", or hex)
    fault         answer the call with a DCE-RPC fault (name such as "SERVER_TOO_BUSY", or hex)
    bind_nak      refuse the bind with this reason (name or number); matches on `client` only
    close         true: close the connection without a reply
    delay         seconds to wait before answering (or closing), at most MAX_DELAY
    count         the count to report, or "threshold-1" (one short of the request's policy)
    tamper        a reply that fails this check of a strict client (see TAMPER_CHECKS)
    epid          the ePID to answer with
    hwid          the HWID to answer with (V6), 16 hex digits
    activation_interval, renewal_interval   minutes to tell the client
lifetime
    name          a label shown in the journal and /api/rules (default "rule N")
    times         the rule goes after this many matches
    seconds       the rule goes this many seconds (host clock) after it was added
"""

from __future__ import annotations

import fnmatch
import ipaddress
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any
from uuid import UUID

from .config import parse_hwid
from .protocol.errors import FaultStatus, HResult
from .protocol.kms import BaseRequest
from .protocol.products import Application, KmsItem, ProductNameError, Sku, products
from .protocol.rpc import NakReason

CONFIG = "config"  # the origin of the configuration's rules (a reload replaces them)
MAX_DELAY = 300.0  # seconds; longer than any client waits
MAX_RULES = 1000
THRESHOLD_MINUS_ONE = "threshold-1"
UINT32 = 0xFFFFFFFF
MAX_EPID_UNITS = 63

# The strict client's check names (kmsclient.verify, NotGenuine.check) a reply can be made
# to fail, and the protocol versions whose replies have the field the check looks at.
TAMPER_CHECKS: dict[str, frozenset[int]] = {
    "mac": frozenset({4}),
    "hmac": frozenset({6}),
    "xored_ivs": frozenset({6}),
    "response_iv": frozenset({5}),
    "hash": frozenset({5, 6}),
    "decrypt": frozenset({5, 6}),
    "size": frozenset({4, 5, 6}),
    "epid": frozenset({4, 5, 6}),
    "epid_format": frozenset({4, 5, 6}),
    "version": frozenset({4, 5, 6}),
    "client_machine_id": frozenset({4, 5, 6}),
    "request_time": frozenset({4, 5, 6}),
    "rpc_call_id": frozenset({4, 5, 6}),
    "ndr_referent": frozenset({4, 5, 6}),
}
RPC_TAMPER_CHECKS = frozenset({"rpc_call_id", "ndr_referent"})  # made by the server
KMS_TAMPER_CHECKS = frozenset(TAMPER_CHECKS) - RPC_TAMPER_CHECKS  # made by the host
MATCH_KEYS = ("application", "kms_id", "product", "cmid", "workstation", "protocol", "client")
ACTION_KEYS = ("hresult", "fault", "bind_nak", "close")
REPLY_KEYS = (
    "count",
    "tamper",
    "epid",
    "hwid",
    "activation_interval",
    "renewal_interval",
)
NUMBER_KEYS = ("count", "delay", "times", "seconds", "activation_interval", "renewal_interval")
FLAG_KEYS = ("close",)
KEYS = ("name", *MATCH_KEYS, *ACTION_KEYS, "delay", *REPLY_KEYS, "times", "seconds")


class RuleError(ValueError):
    """A rule that cannot be used; the message names the key and what is accepted."""


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Match:
    """What a request must hold; GUIDs as a request sends them (UUID.bytes_le)."""

    application: bytes | None = None
    kms_id: bytes | None = None
    sku: bytes | None = None
    cmid: bytes | None = None
    workstation: str | None = None  # casefolded glob
    protocols: frozenset[int] | None = None
    client: Network | None = None

    def matches(self, base: BaseRequest, address: str) -> bool:
        if self.application is not None and base.application_id != self.application:
            return False
        if self.kms_id is not None and base.kms_id != self.kms_id:
            return False
        if self.sku is not None and base.sku_id != self.sku:
            return False
        if self.cmid is not None and base.client_machine_id != self.cmid:
            return False
        if self.protocols is not None and base.major not in self.protocols:
            return False
        if self.workstation is not None and not fnmatch.fnmatchcase(
            base.workstation.casefold(), self.workstation
        ):
            return False
        return self.client is None or self.matches_address(address)

    def matches_address(self, address: str) -> bool:
        if self.client is None:
            return True
        try:
            return ipaddress.ip_address(address) in self.client
        except ValueError:
            return False


@dataclass(frozen=True, slots=True)
class Response:
    """What a matching request gets. The reply fields apply only when no action is set."""

    hresult: int | None = None
    fault: int | None = None
    bind_nak: int | None = None
    close: bool = False
    delay: float = 0.0
    count: int | None = None
    below_threshold: bool = False  # count "threshold-1"
    tamper: str | None = None
    epid: str | None = None
    hwid: bytes | None = None
    activation_interval: int | None = None
    renewal_interval: int | None = None

    def count_for(self, required: int, counted: int) -> int:
        if self.below_threshold:
            return max(required - 1, 0)
        return counted if self.count is None else self.count


@dataclass(slots=True)
class Rule:
    match: Match
    response: Response
    spec: dict[str, Any]  # the rule as given, validated and in canonical form
    name: str = ""
    origin: str = "python"  # where it came from: config, api or python
    times: int | None = None  # matches left; None: unlimited
    seconds: float | None = None
    id: int = 0
    added: float = 0.0  # host time
    used: int = 0

    @property
    def expires(self) -> float | None:
        return None if self.seconds is None else self.added + self.seconds

    def describe(self) -> dict[str, Any]:
        """The rule as /api/rules shows it."""
        return {
            "id": self.id,
            **self.spec,
            "name": self.name,
            "origin": self.origin,
            "used": self.used,
            "times_left": self.times,
            "expires": self.expires,
        }


def _text(spec: Mapping[str, Any], key: str) -> str:
    value = spec[key]
    if isinstance(value, UUID):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise RuleError(f"{key}: expected a non-empty string, got {value!r}")
    return value.strip()


def _integer(spec: Mapping[str, Any], key: str, low: int, high: int) -> int:
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RuleError(f"{key}: expected a whole number {low}..{high}, got {value!r}")
    return value


def _number(spec: Mapping[str, Any], key: str, high: float) -> float:
    value = spec[key]
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 < value <= high
    ):
        raise RuleError(f"{key}: expected seconds, more than 0 and at most {high:g}, got {value!r}")
    return float(value)


def _guid(text: str) -> UUID | None:
    try:
        return UUID(text)
    except ValueError:
        return None


def _named(key: str, text: str, find: Callable[[str], Application | KmsItem | Sku]) -> UUID:
    """A product database ID by name as people type it (the CLI's resolution), or any GUID
    (an unknown one matches what clients send)."""
    try:
        return find(text).id
    except ProductNameError as exc:
        guid = _guid(text)
        if guid is None:
            raise RuleError(f"{key}: {exc} (kmsclient activate --list-products)") from None
        return guid


def _code(spec: Mapping[str, Any], key: str, names: type[IntEnum]) -> int:
    """A status by its name in `names` (any case) or as a number / hex string."""
    value = spec[key]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= UINT32:
        return value
    if isinstance(value, str):
        text = value.strip()
        member = names.__members__.get(text.upper())
        if member is not None:
            return int(member)
        try:
            number = int(text, 0)
        except ValueError:
            number = -1
        if 0 <= number <= UINT32:
            return number
    known = ", ".join(names.__members__)
    raise RuleError(f"{key}: expected one of {known}, or a 32-bit number such as 0x{1:08X}")


def _protocols(spec: Mapping[str, Any]) -> frozenset[int]:
    value = spec["protocol"]
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(text, str) and text.strip().removesuffix(".0") in ("4", "5", "6"):
        return frozenset({int(text.strip().removesuffix(".0"))})
    raise RuleError(f"protocol: expected 4, 5 or 6, got {value!r}")


def parse_rule(spec: Mapping[str, Any], origin: str = "python") -> Rule:
    """A rule from its keys (module docstring); raises RuleError naming what is wrong.
    `origin`: where it comes from (a reload replaces the rules of the configuration)."""
    unknown = [key for key in spec if key not in KEYS]
    if unknown:
        raise RuleError(f"unknown key {unknown[0]!r} (known: {', '.join(KEYS)})")
    canon: dict[str, Any] = {}
    match: dict[str, Any] = {}
    if "application" in spec:
        text = canon.setdefault("application", _text(spec, "application"))
        match["application"] = _named("application", text, products().find_application).bytes_le
    if "kms_id" in spec:
        text = canon.setdefault("kms_id", _text(spec, "kms_id"))
        match["kms_id"] = _named("kms_id", text, products().find_kms_item).bytes_le
    if "product" in spec:
        text = canon.setdefault("product", _text(spec, "product"))
        match["sku"] = _named("product", text, products().find_sku).bytes_le
    if "cmid" in spec:
        cmid = _guid(_text(spec, "cmid"))
        if cmid is None:
            raise RuleError(f"cmid: {spec['cmid']!r} is not a GUID")
        match["cmid"] = cmid.bytes_le
        canon["cmid"] = str(cmid)
    if "workstation" in spec:
        canon["workstation"] = _text(spec, "workstation")
        match["workstation"] = canon["workstation"].casefold()
    if "protocol" in spec:
        match["protocols"] = _protocols(spec)
        canon["protocol"] = next(iter(match["protocols"]))
    if "client" in spec:
        text = _text(spec, "client")
        try:
            match["client"] = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise RuleError(f"client: {text!r} is not an address or network (CIDR)") from None
        canon["client"] = str(match["client"])

    actions = [key for key in ACTION_KEYS if key in spec]
    if len(actions) > 1:
        raise RuleError(f"{actions[0]} and {actions[1]}: a rule answers one way only")
    replies = [key for key in REPLY_KEYS if key in spec]
    if actions and replies:
        raise RuleError(f"{replies[0]}: applies to a reply, not with {actions[0]}")
    response: dict[str, Any] = {}
    if "hresult" in spec:
        response["hresult"] = _code(spec, "hresult", HResult)
        canon["hresult"] = f"0x{response['hresult']:08X}"
        if response["hresult"] == 0:
            raise RuleError("hresult: 0 is success; leave hresult out for a reply")
    if "fault" in spec:
        response["fault"] = _code(spec, "fault", FaultStatus)
        canon["fault"] = f"0x{response['fault']:08X}"
    if "bind_nak" in spec:
        response["bind_nak"] = _code(spec, "bind_nak", NakReason)
        if response["bind_nak"] > 0xFFFF:
            raise RuleError(f"bind_nak: reason {response['bind_nak']} is not 16-bit")
        canon["bind_nak"] = response["bind_nak"]
        others = [key for key in MATCH_KEYS if key in spec and key != "client"]
        if others or "delay" in spec:
            bad = others[0] if others else "delay"
            raise RuleError(
                f"{bad}: a bind_nak refuses the connection before any request is read, so "
                "it can match on client only, without delay"
            )
    if "close" in spec:
        if spec["close"] is not True:
            raise RuleError(f"close: expected true, got {spec['close']!r}")
        response["close"] = canon["close"] = True
    if "delay" in spec:
        response["delay"] = canon["delay"] = _number(spec, "delay", MAX_DELAY)
    if "count" in spec:
        if isinstance(spec["count"], str) and spec["count"].replace(" ", "") == THRESHOLD_MINUS_ONE:
            response["below_threshold"] = True
            canon["count"] = THRESHOLD_MINUS_ONE
        else:
            response["count"] = canon["count"] = _count(spec)
    if "tamper" in spec:
        check = _text(spec, "tamper")
        versions = TAMPER_CHECKS.get(check)
        if versions is None:
            raise RuleError(f"tamper: unknown check {check!r} (known: {', '.join(TAMPER_CHECKS)})")
        asked = match.get("protocols")
        if asked is not None and not asked & versions:
            raise RuleError(
                f"tamper: a V{next(iter(asked))} reply has no {check!r} check "
                f"(it is in V{', V'.join(map(str, sorted(versions)))})"
            )
        match["protocols"] = versions if asked is None else asked & versions
        response["tamper"] = canon["tamper"] = check
    if "epid" in spec:
        epid = _text(spec, "epid")
        if len(epid.encode("utf-16-le")) > 2 * MAX_EPID_UNITS:
            raise RuleError(f"epid: longer than {MAX_EPID_UNITS} UTF-16 code units")
        response["epid"] = canon["epid"] = epid
    if "hwid" in spec:
        try:
            hwid = parse_hwid(_text(spec, "hwid"))
        except ValueError as exc:
            raise RuleError(f"hwid: {exc}") from None
        response["hwid"] = hwid
        canon["hwid"] = hwid.hex().upper()
    for key in ("activation_interval", "renewal_interval"):
        if key in spec:
            response[key] = canon[key] = _integer(spec, key, 0, UINT32)

    times = seconds = None
    if "times" in spec:
        times = canon["times"] = _integer(spec, "times", 1, UINT32)
    if "seconds" in spec:
        seconds = canon["seconds"] = _number(spec, "seconds", 100 * 365 * 86400.0)
    name = ""
    if "name" in spec:
        name = canon["name"] = _text(spec, "name")
    return Rule(Match(**match), Response(**response), canon, name, origin, times, seconds)


def _count(spec: Mapping[str, Any]) -> int:
    value = spec["count"]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= UINT32:
        raise RuleError(f"count: expected a whole number or {THRESHOLD_MINUS_ONE!r}, got {value!r}")
    return value


@dataclass
class RuleSet:
    """The host's rules in order. Not thread-safe: used on the event loop's thread."""

    rules: list[Rule] = field(default_factory=list)
    next_id: int = 1
    binds: int = 0  # rules that answer binds (so that connections skip the check otherwise)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def reserve(self, count: int) -> None:
        """Raise RuleError unless `count` more rules fit."""
        if len(self.rules) + count > MAX_RULES:
            raise RuleError(f"at most {MAX_RULES} rules at once ({len(self.rules)} now)")

    def add(self, rule: Rule, now: float) -> Rule:
        """Add a rule after the others, but ahead of the configuration's: those are the
        baseline that a test's own rules override."""
        self.reserve(1)
        rule.id, rule.added = self.next_id, now
        rule.name = rule.name or f"rule {rule.id}"
        self.next_id += 1
        at = len(self.rules)
        if rule.origin != CONFIG:
            at = next((i for i, r in enumerate(self.rules) if r.origin == CONFIG), at)
        self.rules.insert(at, rule)
        self._recount()
        return rule

    def remove(self, rule_id: int) -> bool:
        kept = [r for r in self.rules if r.id != rule_id]
        found = len(kept) != len(self.rules)
        self.rules = kept
        self._recount()
        return found

    def clear(self) -> None:
        self.rules = []
        self._recount()

    def configure(self, specs: Iterable[Mapping[str, Any]], now: float) -> None:
        """Put the configuration's rules in place of those it gave before (at start and on
        reload), after the others."""
        rules = [parse_rule(spec, origin=CONFIG) for spec in specs]
        self.rules = [r for r in self.rules if r.origin != CONFIG]
        for rule in rules:
            self.add(rule, now)

    def current(self, now: float) -> list[Rule]:
        """The rules still in force (expired ones are dropped)."""
        self.rules = [r for r in self.rules if (e := r.expires) is None or now < e]
        self._recount()
        return self.rules

    def _recount(self) -> None:
        self.binds = sum(1 for r in self.rules if r.response.bind_nak is not None)

    def match(self, base: BaseRequest, address: str, now: float) -> Rule | None:
        """The first rule in force that matches a request (its use is counted)."""
        for rule in self.rules:
            if (
                rule.response.bind_nak is None
                and rule.match.matches(base, address)
                and self._use(rule, now)
            ):
                return rule
        return None

    def match_bind(self, address: str, now: float) -> Rule | None:
        """The first bind_nak rule in force for a connection from `address`."""
        for rule in self.rules:
            if (
                rule.response.bind_nak is not None
                and rule.match.matches_address(address)
                and self._use(rule, now)
            ):
                return rule
        return None

    def _use(self, rule: Rule, now: float) -> bool:
        expires = rule.expires
        if expires is not None and now >= expires:
            self.remove(rule.id)
            return False
        rule.used += 1
        if rule.times is not None:
            rule.times -= 1
            if not rule.times:
                self.remove(rule.id)
        return True
