"""Fleet scenarios: hosts, client groups and outages, read from a TOML file.

Times are offsets from the scenario's start: a number of days, or text such as "2d 9h",
"90m", "1d12h30m". See scenarios/README.md for every key.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmsd.protocol.constants import DEFAULT_ACTIVATION_INTERVAL, DEFAULT_RENEWAL_INTERVAL
from kmsd.protocol.products import ProductNameError, Sku, products

from ..licensing import DAY, HOUR, MINUTE

DEFAULT_START = "2025-01-06T00:00:00Z"  # a Monday
MAX_CLIENTS = 1_000_000
MAX_DAYS = 3660
_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([dhm])\s*")
_UNITS = {"d": DAY, "h": HOUR, "m": MINUTE}
_SCENARIO_KEYS = {"name", "description", "start", "days", "seed", "hosts", "groups"}
_HOST_KEYS = {"name", "priority", "weight", "outages", "precharge"}
_HOST_KEYS |= {"activation_interval", "renewal_interval"}
_GROUP_KEYS = {"name", "product", "count", "join", "spread", "vm", "leaving", "hosts"}
_GROUP_KEYS |= {"leave", "leave_spread"}


class ScenarioError(ValueError):
    """A scenario that cannot be run; the message names the key."""


def parse_duration(value: object) -> float:
    """Seconds: a number of days, or text of d/h/m parts ("2d 9h", "90m")."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        seconds = float(value) * DAY
    elif isinstance(value, str):
        pos, seconds = 0, 0.0
        for match in _DURATION.finditer(value):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if pos != len(value) or not value.strip():
            raise ValueError(f"{value!r} is not a duration such as 2d, 9h, 90m or 1d12h")
    else:
        raise ValueError(f"{value!r} is not a duration")
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a finite duration")
    if seconds < 0:
        raise ValueError(f"{value!r} is negative")
    return seconds


@dataclass(frozen=True, slots=True)
class HostSpec:
    name: str
    priority: int = 0  # SRV priority: lower is tried first
    weight: int = 100  # SRV weight within a priority
    outages: tuple[tuple[float, float], ...] = ()  # [from, until) offsets: no answer
    activation_interval: int = DEFAULT_ACTIVATION_INTERVAL  # minutes
    renewal_interval: int = DEFAULT_RENEWAL_INTERVAL  # minutes
    precharge: int = 0

    def down(self, offset: float) -> bool:
        return any(start <= offset < end for start, end in self.outages)


@dataclass(frozen=True, slots=True)
class GroupSpec:
    name: str
    sku: Sku
    count: int
    join: float = 0.0  # offset of the first join
    spread: float = 0.0  # joins are spread evenly over this period
    vm: float = 0.0  # share of virtual machines (the first ones to join)
    leaving: int = 0  # how many leave (the first ones to join)
    leave: float = 0.0  # offset of the first leave
    leave_spread: float = 0.0
    hosts: tuple[str, ...] = ()  # hosts this group knows; empty: every host (DNS)

    def join_offset(self, i: int) -> float:
        return self.join + (self.spread * i / self.count if self.count else 0.0)

    def leave_offset(self, i: int) -> float | None:
        if i >= self.leaving:
            return None
        return self.leave + self.leave_spread * i / self.leaving


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    start: float  # Unix time of offset 0
    duration: float  # seconds simulated
    seed: int
    hosts: tuple[HostSpec, ...]
    groups: tuple[GroupSpec, ...]

    @property
    def clients(self) -> int:
        return sum(g.count for g in self.groups)


def _get(table: dict[str, Any], key: str, kind: type, where: str, default: Any) -> Any:
    value = table.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ScenarioError(f"{where}.{key}: expected {kind.__name__}, got {value!r}")
    return value


def _duration(table: dict[str, Any], key: str, where: str, default: object = 0) -> float:
    try:
        return parse_duration(table.get(key, default))
    except ValueError as exc:
        raise ScenarioError(f"{where}.{key}: {exc}") from None


def _check_keys(table: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ScenarioError(
            f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})"
        )


def _host(table: dict[str, Any], where: str) -> HostSpec:
    _check_keys(table, _HOST_KEYS, where)
    outages = []
    for i, outage in enumerate(table.get("outages", [])):
        at = f"{where}.outages[{i}]"
        if not isinstance(outage, dict):
            raise ScenarioError(f"{at}: expected a table {{from = ..., until = ...}}")
        _check_keys(outage, {"from", "until"}, at)
        start, end = _duration(outage, "from", at), _duration(outage, "until", at, MAX_DAYS)
        if end <= start:
            raise ScenarioError(f"{at}: until must be after from")
        outages.append((start, end))
    spec = HostSpec(
        name=_get(table, "name", str, where, "kms"),
        priority=_get(table, "priority", int, where, 0),
        weight=_get(table, "weight", int, where, 100),
        outages=tuple(outages),
        activation_interval=_get(
            table, "activation_interval", int, where, DEFAULT_ACTIVATION_INTERVAL
        ),
        renewal_interval=_get(table, "renewal_interval", int, where, DEFAULT_RENEWAL_INTERVAL),
        precharge=_get(table, "precharge", int, where, 0),
    )
    if not 0 <= spec.priority <= 65535 or not 0 <= spec.weight <= 65535:
        raise ScenarioError(f"{where}: priority and weight must be 0-65535")
    if spec.activation_interval < 1 or spec.renewal_interval < 1 or spec.precharge < 0:
        raise ScenarioError(f"{where}: intervals must be at least 1 minute, precharge >= 0")
    return spec


def _group(table: dict[str, Any], where: str, hosts: set[str]) -> GroupSpec:
    _check_keys(table, _GROUP_KEYS, where)
    product = _get(table, "product", str, where, "")
    try:
        sku = products().find_sku(product)
    except ProductNameError as exc:
        hint = "(kmsclient activate --list-products)"
        raise ScenarioError(f"{where}.product: {exc} {hint}") from None
    count = _get(table, "count", int, where, 1)
    leaving = _get(table, "leaving", int, where, 0)
    vm = _get(table, "vm", float, where, 0.0)
    group_hosts = tuple(_get(table, "hosts", list, where, []))
    if not 0 <= count <= MAX_CLIENTS or not 0 <= leaving <= count:
        raise ScenarioError(f"{where}: need 0 <= leaving <= count <= {MAX_CLIENTS}")
    if not 0.0 <= vm <= 1.0:
        raise ScenarioError(f"{where}.vm: a share between 0 and 1")
    for name in group_hosts:
        if name not in hosts:
            raise ScenarioError(f"{where}.hosts: no host named {name!r}")
    return GroupSpec(
        name=_get(table, "name", str, where, sku.name),
        sku=sku,
        count=count,
        join=_duration(table, "join", where),
        spread=_duration(table, "spread", where),
        vm=vm,
        leaving=leaving,
        leave=_duration(table, "leave", where),
        leave_spread=_duration(table, "leave_spread", where),
        hosts=group_hosts,
    )


def from_dict(data: dict[str, Any], default_name: str = "scenario") -> Scenario:
    _check_keys(data, _SCENARIO_KEYS, "")
    start_text = _get(data, "start", str, "", DEFAULT_START)
    try:
        start = dt.datetime.fromisoformat(start_text)
    except ValueError:
        raise ScenarioError(f"start: {start_text!r} is not an ISO 8601 time") from None
    if start.tzinfo is None:
        start = start.replace(tzinfo=dt.UTC)
    host_tables = data.get("hosts", [{"name": "kms"}])
    if not isinstance(host_tables, list) or not host_tables:
        raise ScenarioError("hosts: expected at least one [[hosts]] table")
    hosts = tuple(_host(t, f"hosts[{i}]") for i, t in enumerate(host_tables))
    names = {h.name for h in hosts}
    if len(names) != len(hosts):
        raise ScenarioError("hosts: names must be unique")
    groups = tuple(_group(t, f"groups[{i}]", names) for i, t in enumerate(data.get("groups", [])))
    if len({g.name for g in groups}) != len(groups):
        raise ScenarioError("groups: names must be unique")
    duration = _duration(data, "days", "", 30)
    if not 0 < duration <= MAX_DAYS * DAY:
        raise ScenarioError(f"days: between 0 and {MAX_DAYS}")
    scenario = Scenario(
        name=_get(data, "name", str, "", default_name),
        description=_get(data, "description", str, "", ""),
        start=start.timestamp(),
        duration=duration,
        seed=_get(data, "seed", int, "", 1),
        hosts=hosts,
        groups=groups,
    )
    if scenario.clients > MAX_CLIENTS:
        raise ScenarioError(f"groups: more than {MAX_CLIENTS} clients")
    return scenario


def load(path: Path) -> Scenario:
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    try:
        return from_dict(data, path.stem)
    except ScenarioError as exc:
        raise ScenarioError(f"{path}: {exc}") from None
