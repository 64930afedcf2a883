"""kmsclient.licensing: one client's states and schedule, driven by hand (no host)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from kmsclient.licensing import (
    DAY,
    HOUR,
    VALIDITY,
    Kind,
    LicensingClient,
    State,
    StaticHost,
)

WEEK_MIN = 7 * 24 * 60


class Hosts:
    """Discovery that returns a fixed order."""

    def __init__(self, *names: str) -> None:
        self.names = names
        self.calls = 0

    def candidates(self, rng: random.Random) -> Sequence[str]:
        self.calls += 1
        return self.names


def client(*hosts: str, required: int = 25) -> LicensingClient:
    discovery = Hosts(*hosts) if len(hosts) > 1 else StaticHost(hosts[0] if hosts else "kms")
    return LicensingClient(required, 0.0, discovery, random.Random(1))


def test_waits_below_threshold_then_activates_renews_and_expires() -> None:
    c = client()
    assert c.timer == 0.0 and c.state == State.UNLICENSED
    c.poll(0.0)
    assert c.contact == "kms"
    ev = c.on_answer(0.0, 24, 120, WEEK_MIN)
    assert (ev.kind, c.state, c.timer) == (Kind.BELOW, State.WAITING, 2 * HOUR)
    assert c.poll(HOUR) == [] and c.contact is None  # nothing due before the timer
    c.poll(2 * HOUR)
    ev = c.on_answer(2 * HOUR, 25, 120, WEEK_MIN)
    assert (ev.kind, c.state) == (Kind.ACTIVATED, State.LICENSED)
    assert c.valid_until == 2 * HOUR + VALIDITY
    assert c.timer == 2 * HOUR + 7 * DAY
    c.poll(c.timer)
    ev = c.on_answer(c.timer, 30, 120, WEEK_MIN)
    assert ev.kind == Kind.RENEWED and c.valid_until == 2 * HOUR + 7 * DAY + VALIDITY
    # From now on the host answers below the threshold: retries every 2 hours, still
    # licensed, until 180 days after the last renewal.
    last_renewal = 2 * HOUR + 7 * DAY
    now = last_renewal + 7 * DAY
    below = 0
    for _ in range(10_000):
        if c.timer >= last_renewal + VALIDITY:
            break
        now = c.timer
        c.poll(now)
        ev = c.on_answer(now, 10, 120, WEEK_MIN)
        assert ev.kind == Kind.BELOW and c.state == State.RENEWAL_DUE and c.licensed
        below += 1
    assert below == (VALIDITY - 7 * DAY) / (2 * HOUR)  # every 2 hours for 173 days
    assert c.timer == last_renewal + VALIDITY
    events = c.poll(c.timer)
    assert [(e.kind, e.time) for e in events] == [(Kind.EXPIRED, last_renewal + VALIDITY)]
    assert c.state == State.EXPIRED and not c.licensed
    assert c.contact == "kms"  # a 2-hourly retry falls on the same instant
    ev = c.on_answer(last_renewal + VALIDITY, 25, 120, WEEK_MIN)
    assert ev.kind == Kind.ACTIVATED and c.state == State.LICENSED


def test_intervals_come_from_the_host() -> None:
    c = client(required=5)
    c.poll(0.0)
    c.on_answer(0.0, 1, 30, 60)
    assert c.timer == 30 * 60
    c.poll(c.timer)
    c.on_answer(c.timer, 5, 30, 60)
    assert c.timer == 30 * 60 + 60 * 60


def test_unreachable_host_retries_after_the_activation_interval() -> None:
    c = client()
    c.poll(0.0)
    ev = c.on_unreachable(0.0)
    assert (ev.kind, c.state, c.contact, c.timer) == (Kind.FAILED, State.UNLICENSED, None, 2 * HOUR)
    c.poll(2 * HOUR)
    c.on_answer(2 * HOUR, 25, 120, WEEK_MIN)
    renew = c.timer
    c.poll(renew)
    ev = c.on_unreachable(renew)
    assert (ev.kind, c.state, c.timer) == (Kind.FAILED, State.RENEWAL_DUE, renew + 2 * HOUR)
    c.poll(c.timer)
    assert c.contact == "kms"  # the static host: asked again
    ev = c.on_answer(c.timer, 25, 120, WEEK_MIN)
    assert ev.kind == Kind.RENEWED


def test_refused_keeps_the_host_and_retries() -> None:
    c = client("a", "b")
    c.poll(0.0)
    assert c.contact == "a"
    ev = c.on_refused(0.0)
    assert ev.kind == Kind.FAILED and c.cached == "a" and c.timer == 2 * HOUR


def test_failover_caches_the_host_that_answers_and_rediscovers_without_the_failed_one() -> None:
    hosts = Hosts("a", "b", "c")
    c = LicensingClient(25, 0.0, hosts, random.Random(1))
    c.poll(0.0)
    assert c.contact == "a"
    assert c.on_unreachable(0.0).kind == Kind.FAILOVER and c.contact == "b"
    c.on_answer(0.0, 25, 120, WEEK_MIN)
    assert c.cached == "b" and hosts.calls == 1
    renew = c.timer
    c.poll(renew)
    assert c.contact == "b" and hosts.calls == 1  # renewals go to the cached host
    ev = c.on_unreachable(renew)
    assert ev.kind == Kind.FAILOVER and hosts.calls == 2
    assert c.cached is None and c.contact == "a"  # discovered again, "b" left out
    assert c.on_unreachable(renew).kind == Kind.FAILOVER and c.contact == "c"
    ev = c.on_unreachable(renew)
    assert ev.kind == Kind.FAILED and c.contact is None and c.state == State.RENEWAL_DUE
    c.poll(c.timer)
    assert c.contact == "a" and hosts.calls == 3  # nothing cached: discover again


def test_no_host_found_is_a_failed_attempt() -> None:
    c = LicensingClient(25, 0.0, Hosts(), random.Random(1))
    events = c.poll(0.0)
    assert [e.kind for e in events] == [Kind.FAILED] and c.timer == 2 * HOUR


def test_answer_without_a_request_is_a_programming_error() -> None:
    with pytest.raises(RuntimeError):
        client().on_answer(0.0, 1, 120, WEEK_MIN)
