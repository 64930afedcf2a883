"""A fleet of simulated KMS clients on a virtual clock that jumps from event to event.

Each client is a kmsclient.licensing.LicensingClient; the fleet wakes the client whose
timer is next, lets it talk to its host through a Transport and moves on, so a year of a
10,000-client network takes seconds. The hosts run on the same virtual clock: in process
(`InProcess`: kmsd's KmsHost with `now` = virtual time) or as real kmsd daemons over
loopback (`Loopback`: kmsd --clock-file, which the fleet rewrites before each exchange).
Host outages are part of the scenario and behave alike in both: a host that is down does
not answer.
"""

from __future__ import annotations

import heapq
import os
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from kmsd.cache import MemoryCounter
from kmsd.host import HostIdentity, HostPolicy, KmsHost
from kmsd.protocol.checks import verify_reply
from kmsd.protocol.client import base_request, prepare
from kmsd.protocol.constants import filetime
from kmsd.protocol.errors import KmsError, NotGenuine
from kmsd.protocol.kms import BaseRequest
from kmsd.protocol.products import products

from ..activation import CallOptions, activate
from ..discovery import order
from ..licensing import DAY, HOUR, Event, Kind, LicensingClient, StaticHost
from ..outcome import Status
from ..target import Target
from .scenario import GroupSpec, HostSpec, Scenario

LICENSE_STATUS = {"unlicensed": 2, "waiting": 2, "licensed": 1, "renewal_due": 1, "expired": 3}
TALLIES = ("requests", *(k.value for k in Kind), "joined", "left")


# Replies, as a transport reports them.


@dataclass(frozen=True, slots=True)
class Answer:
    count: int
    activation_interval: int  # minutes
    renewal_interval: int  # minutes


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str


@dataclass(frozen=True, slots=True)
class Unreachable:
    reason: str


Reply = Answer | Refused | Unreachable


class Transport(Protocol):
    mode: str

    async def exchange(self, host: str, request: BaseRequest, now: float) -> Reply:
        """One activation request to `host` at Unix time `now`."""
        ...


def make_host(spec: HostSpec, now: float) -> KmsHost:
    db = products()
    identity = HostIdentity(hwid=bytes(8))
    identity.complete(db, os.urandom, now)
    policy = HostPolicy(
        activation_interval=spec.activation_interval,
        renewal_interval=spec.renewal_interval,
        precharge=spec.precharge,
    )
    return KmsHost(MemoryCounter(known=frozenset(db.applications)), identity, policy, database=db)


class InProcess:
    """kmsd's host logic in this process. `wire`: every request is encoded, answered by
    KmsHost.answer and the reply verified as over the network (about 100 µs each);
    otherwise the host's checks and counter are called directly (a few µs)."""

    def __init__(self, scenario: Scenario, *, wire: bool = False) -> None:
        self.wire = wire
        self.mode = "in-process (wire)" if wire else "in-process"
        self.hosts = {h.name: make_host(h, scenario.start) for h in scenario.hosts}

    async def exchange(self, host: str, request: BaseRequest, now: float) -> Reply:
        kms = self.hosts[host]
        try:
            if self.wire:
                prepared = prepare(request)
                payload, _ = kms.answer(prepared.message, now, "simulated")
                base = verify_reply(request, prepared.iv, payload).reply.base
                return Answer(base.count, base.activation_interval, base.renewal_interval)
            count = kms.count(request, now, "simulated")
        except KmsError as exc:
            return Refused(f"HRESULT 0x{exc.hresult:08X}: {exc.reason}")
        except NotGenuine as exc:
            return Refused(f"not genuine: {exc.check}")
        return Answer(count, kms.policy.activation_interval, kms.policy.renewal_interval)


class Loopback:
    """Real kmsd daemons, each started with `--clock-file` on `clock_file`: the file is
    rewritten (atomically) with the virtual time before each exchange. One connection per
    request, as Windows clients do; every reply is verified."""

    mode = "kmsd over loopback"

    def __init__(self, targets: dict[str, Target], clock_file: Path, timeout: float = 5.0):
        self.targets = targets
        self.clock_file = clock_file
        self.options = CallOptions(timeout=timeout)
        self._written: float | None = None
        self.unreachable: list[str] = []  # a daemon that did not answer (not an outage)

    def set_clock(self, now: float) -> None:
        if now != self._written:
            write_clock(self.clock_file, now)
            self._written = now

    async def exchange(self, host: str, request: BaseRequest, now: float) -> Reply:
        self.set_clock(now)
        result = await activate(self.targets[host], prepare(request), self.options)
        if result.verified is not None:
            base = result.verified.reply.base
            return Answer(base.count, base.activation_interval, base.renewal_interval)
        reason = result.failure.message if result.failure else result.status.label
        if result.status == Status.UNREACHABLE:
            self.unreachable.append(f"{host} ({self.targets[host]}): {reason}")
            return Unreachable(reason)
        return Refused(reason)


def write_clock(path: Path, now: float) -> None:
    """The clock file kmsd --clock-file reads: a Unix time, replaced in one rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{now!r}\n")
    tmp.replace(path)


@dataclass(frozen=True, slots=True)
class SrvHost:
    name: str
    priority: int
    weight: int


@dataclass(frozen=True, slots=True)
class SrvDiscovery:
    """The scenario's hosts as DNS SRV records, tried in RFC 2782 order (priority, then a
    weighted random draw: kmsclient.discovery.order, as a real lookup would)."""

    records: tuple[SrvHost, ...]

    def candidates(self, rng: random.Random) -> Sequence[str]:
        return [r.name for r in order(self.records, rng)]


@dataclass(slots=True)
class Sample:
    """The fleet at the end of one period, and what happened during it."""

    offset: float  # seconds from the start: the end of the period
    licensed: dict[str, int]  # per group
    counts: dict[str, int]  # "host/application" -> the count it last reported
    tallies: dict[str, int]  # requests, activated, renewed, ... during the period


@dataclass(frozen=True, slots=True)
class ClientEvent:
    client: str
    group: str
    offset: float  # seconds from the start
    kind: Kind
    state: str
    host: str | None
    count: int | None


@dataclass(slots=True)
class GroupResult:
    name: str
    product: str
    application: str
    threshold: int
    clients: int
    first_activated: float | None = None  # offset of the group's first activation
    all_licensed: float | None = None  # offset when every client present was licensed
    licensed_at_end: int = 0


@dataclass
class Timeline:
    scenario: Scenario
    mode: str
    step: float
    samples: list[Sample]
    groups: list[GroupResult]
    totals: dict[str, int]
    events: list[ClientEvent] | None
    wall_seconds: float = 0.0


@dataclass(slots=True)
class _Client:
    name: str
    group: int
    request: BaseRequest  # the fields that do not change; the time is set per request
    leave_at: float | None
    machine: LicensingClient | None = None
    gone: bool = False


@dataclass
class _Run:
    scenario: Scenario
    transport: Transport
    keep_events: bool
    step: float
    rng: random.Random
    hosts: dict[str, HostSpec] = field(default_factory=dict)
    clients: list[_Client] = field(default_factory=list)
    licensed: dict[str, int] = field(default_factory=dict)
    present: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    tallies: dict[str, int] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    events: list[ClientEvent] = field(default_factory=list)
    results: list[GroupResult] = field(default_factory=list)


def default_step(duration: float) -> float:
    """Hourly samples for scenarios of up to two weeks, daily ones beyond."""
    return HOUR if duration <= 14 * DAY else DAY


def _discovery(scenario: Scenario, group: GroupSpec) -> StaticHost | SrvDiscovery:
    names = group.hosts or tuple(h.name for h in scenario.hosts)
    if len(names) == 1:
        return StaticHost(names[0])
    specs = {h.name: h for h in scenario.hosts}
    return SrvDiscovery(tuple(SrvHost(n, specs[n].priority, specs[n].weight) for n in names))


async def simulate(
    scenario: Scenario,
    transport: Transport,
    *,
    keep_events: bool = False,
    step: float | None = None,
) -> Timeline:
    """Run `scenario` to its end; `keep_events` keeps every client's events."""
    began = time.perf_counter()
    run = _Run(
        scenario,
        transport,
        keep_events,
        step or default_step(scenario.duration),
        random.Random(scenario.seed),
    )
    run.hosts = {h.name: h for h in scenario.hosts}
    run.tallies = dict.fromkeys(TALLIES, 0)
    run.totals = dict.fromkeys(TALLIES, 0)
    heap: list[tuple[float, int, int]] = []
    discoveries = [_discovery(scenario, g) for g in scenario.groups]
    width = len(str(max((g.count for g in scenario.groups), default=1)))
    for gi, group in enumerate(scenario.groups):
        run.licensed[group.name] = run.present[group.name] = 0
        run.results.append(
            GroupResult(
                group.name,
                group.sku.name,
                group.sku.kms.application.name,
                group.sku.kms.n_policy,
                group.count,
            )
        )
        vms = round(group.vm * group.count)
        for i in range(group.count):
            name = f"{group.name}-{i + 1:0{width}d}"
            request = base_request(
                group.sku,
                client_machine_id=uuid.UUID(int=run.rng.getrandbits(128), version=4),
                workstation=name[:63],
                now=scenario.start,
                is_vm=int(i < vms),
            )
            heapq.heappush(heap, (group.join_offset(i), len(run.clients), len(run.clients)))
            run.clients.append(_Client(name, gi, request, group.leave_offset(i)))
    next_sample = run.step
    end = scenario.duration
    seq = len(run.clients)
    for _ in range(10**9):  # bounded: each turn consumes one heap entry
        if not heap or heap[0][0] >= end:
            break
        now, _, index = heapq.heappop(heap)
        while next_sample <= now:
            _sample(run, next_sample)
            next_sample += run.step
        client = run.clients[index]
        wake = await _turn(run, client, discoveries, now)
        if wake is not None:
            seq += 1
            heapq.heappush(heap, (wake, seq, index))
    while next_sample <= end + 1e-9:
        _sample(run, next_sample)
        next_sample += run.step
    for result, group in zip(run.results, scenario.groups, strict=True):
        result.licensed_at_end = run.licensed[group.name]
    return Timeline(
        scenario,
        transport.mode,
        run.step,
        run.samples,
        run.results,
        run.totals,
        run.events if keep_events else None,
        time.perf_counter() - began,
    )


async def _turn(
    run: _Run, client: _Client, discoveries: list[StaticHost | SrvDiscovery], now: float
) -> float | None:
    """Wake one client at `now`; returns when it next needs waking, None when it left."""
    group = run.scenario.groups[client.group]
    machine = client.machine
    if machine is None:
        machine = client.machine = LicensingClient(
            group.sku.kms.n_policy, now, discoveries[client.group], run.rng
        )
        run.present[group.name] += 1
        _tally(run, "joined")
    elif client.leave_at is not None and now >= client.leave_at:
        client.gone = True
        run.present[group.name] -= 1
        if machine.licensed:
            run.licensed[group.name] -= 1
        _tally(run, "left")
        _check_all_licensed(run, client.group, now)
        return None
    was_licensed = machine.licensed
    for event in machine.poll(now):
        _note(run, client, event)
    for _ in range(len(run.hosts) + 1):  # each host is tried at most once per attempt
        host = machine.contact
        if host is None:
            break
        _note(run, client, await _exchange(run, client, machine, host, now))
    if machine.licensed != was_licensed:
        run.licensed[group.name] += 1 if machine.licensed else -1
    _check_all_licensed(run, client.group, now)
    wake = machine.timer
    if client.leave_at is not None and client.leave_at < wake:
        wake = client.leave_at
    return wake


async def _exchange(
    run: _Run, client: _Client, machine: LicensingClient, host: str, now: float
) -> Event:
    _tally(run, "requests")
    if run.hosts[host].down(now):
        return machine.on_unreachable(now)
    base = client.request
    request = base_request_at(base, run.scenario.start + now, LICENSE_STATUS[machine.state])
    reply = await run.transport.exchange(host, request, run.scenario.start + now)
    if isinstance(reply, Answer):
        run.counts[f"{host}/{run.results[client.group].application}"] = reply.count
        return machine.on_answer(
            now, reply.count, reply.activation_interval, reply.renewal_interval
        )
    if isinstance(reply, Refused):
        return machine.on_refused(now)
    return machine.on_unreachable(now)


def base_request_at(base: BaseRequest, now: float, license_status: int) -> BaseRequest:
    """`base` sent at Unix time `now` (its FILETIME follows the virtual clock)."""
    return BaseRequest(
        base.major,
        base.minor,
        base.is_vm,
        license_status,
        base.binding_expiration,
        base.application_id,
        base.sku_id,
        base.kms_id,
        base.client_machine_id,
        base.required_count,
        filetime(now),
        base.previous_client_machine_id,
        base.workstation,
    )


def _tally(run: _Run, key: str) -> None:
    run.tallies[key] += 1
    run.totals[key] += 1


def _note(run: _Run, client: _Client, event: Event) -> None:
    _tally(run, event.kind.value)
    if event.kind == Kind.ACTIVATED:
        result = run.results[client.group]
        if result.first_activated is None:
            result.first_activated = event.time
    if run.keep_events:
        run.events.append(
            ClientEvent(
                client.name,
                run.results[client.group].name,
                event.time,
                event.kind,
                event.state.value,
                event.host,
                event.count,
            )
        )


def _check_all_licensed(run: _Run, group_index: int, now: float) -> None:
    group = run.scenario.groups[group_index]
    result = run.results[group_index]
    if (
        result.all_licensed is None
        and run.present[group.name] == group.count
        and run.licensed[group.name] == group.count
    ):
        result.all_licensed = now


def _sample(run: _Run, offset: float) -> None:
    run.samples.append(Sample(offset, dict(run.licensed), dict(run.counts), run.tallies))
    run.tallies = dict.fromkeys(TALLIES, 0)
