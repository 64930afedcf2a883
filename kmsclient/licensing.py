"""The licensing state of one KMS client over time, sans-IO (DESIGN.md, "The client").

No sockets and no clock: the caller passes `now` to every call, sends a request to the
host named by `contact` and feeds back what happened (on_answer, on_refused,
on_unreachable). The seed's schedule:

- a client that is not licensed asks at once, then every activation interval (2 hours)
  while the host's count is below its threshold or no host answers;
- a licensed client renews every renewal interval (7 days); a failed renewal is retried
  every activation interval; both intervals come from the host's last reply;
- an activation is valid 180 days from the last successful activation or renewal; then
  the client is out of tolerance (expired) and asks again like an unlicensed one.

Host choice follows the seed: the host that answered is cached and used for renewals;
when it does not answer, the client discovers again; a discovered host that does not
answer is dropped from the candidates and the next one is tried, all at the same instant.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from kmsd.protocol.constants import DEFAULT_ACTIVATION_INTERVAL, DEFAULT_RENEWAL_INTERVAL

MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0
VALIDITY = 180 * DAY  # the activation validity interval


class State(StrEnum):
    UNLICENSED = "unlicensed"  # never activated (grace period)
    WAITING = "waiting"  # a host answered with a count below the threshold
    LICENSED = "licensed"
    RENEWAL_DUE = "renewal_due"  # still licensed; the last renewal failed, retrying
    EXPIRED = "expired"  # 180 days without a successful renewal: out of tolerance


LICENSED_STATES = frozenset({State.LICENSED, State.RENEWAL_DUE})


class Kind(StrEnum):
    ACTIVATED = "activated"  # licensed by an answer with count >= threshold
    RENEWED = "renewed"  # a licensed client's renewal succeeded
    BELOW = "below"  # answered, count below the threshold
    REFUSED = "refused"  # the host answered with an error
    FAILOVER = "failover"  # a host did not answer; another one is tried at once
    FAILED = "failed"  # no host answered this attempt
    EXPIRED = "expired"  # the validity interval ran out


@dataclass(frozen=True, slots=True)
class Event:
    time: float
    kind: Kind
    state: State  # the state after the event
    host: str | None = None
    count: int | None = None


class Discovery(Protocol):
    """Where a client finds hosts: the candidates in the order to try them.

    A static host:port is a list of one; DNS SRV discovery orders by priority, then
    randomly by weight (RFC 2782).
    """

    def candidates(self, rng: random.Random) -> Sequence[str]: ...


@dataclass(frozen=True, slots=True)
class StaticHost:
    host: str

    def candidates(self, rng: random.Random) -> Sequence[str]:
        return (self.host,)


class LicensingClient:
    """One client's licensing state. `timer` is when it next needs `poll`."""

    __slots__ = (
        "_candidates",
        "activation_interval",
        "cached",
        "contact",
        "discovery",
        "next_attempt",
        "renewal_interval",
        "required_count",
        "rng",
        "state",
        "valid_until",
    )

    def __init__(
        self,
        required_count: int,
        now: float,
        discovery: Discovery,
        rng: random.Random,
    ) -> None:
        self.required_count = required_count
        self.discovery = discovery
        self.rng = rng
        self.state = State.UNLICENSED
        self.next_attempt = now  # a new client asks at once
        self.valid_until = 0.0
        self.activation_interval = DEFAULT_ACTIVATION_INTERVAL * MINUTE
        self.renewal_interval = DEFAULT_RENEWAL_INTERVAL * MINUTE
        self.cached: str | None = None
        self.contact: str | None = None  # the host to send a request to now
        self._candidates: list[str] = []

    @property
    def licensed(self) -> bool:
        return self.state in LICENSED_STATES

    @property
    def timer(self) -> float:
        if self.state in LICENSED_STATES and self.valid_until < self.next_attempt:
            return self.valid_until
        return self.next_attempt

    def poll(self, now: float) -> list[Event]:
        """Let time pass up to `now`; sets `contact` when a request is due."""
        events = []
        if self.state in LICENSED_STATES and now >= self.valid_until:
            self.state = State.EXPIRED
            events.append(Event(self.valid_until, Kind.EXPIRED, self.state, self.cached))
        if self.contact is None and now >= self.next_attempt:
            if self.cached is not None:
                self.contact = self.cached
                self._candidates = []
            else:
                self._discover(exclude=None)
                if self.contact is None:  # discovery found no host
                    events.append(self._failed(now))
        return events

    def on_answer(
        self, now: float, count: int, activation_interval: int, renewal_interval: int
    ) -> Event:
        """The host in `contact` answered with `count` and its intervals (minutes)."""
        host = self._done()
        self.cached = host
        self.activation_interval = activation_interval * MINUTE
        self.renewal_interval = renewal_interval * MINUTE
        if count >= self.required_count:
            kind = Kind.RENEWED if self.state in LICENSED_STATES else Kind.ACTIVATED
            self.state = State.LICENSED
            self.valid_until = now + VALIDITY
            self.next_attempt = now + self.renewal_interval
            return Event(now, kind, self.state, host, count)
        if self.state == State.LICENSED:
            self.state = State.RENEWAL_DUE
        elif self.state not in LICENSED_STATES:
            self.state = State.WAITING
        self.next_attempt = now + self.activation_interval
        return Event(now, Kind.BELOW, self.state, host, count)

    def on_refused(self, now: float) -> Event:
        """The host in `contact` answered with an error (an HRESULT, a fault, a reply that
        failed verification): this attempt failed; the host stays cached, it answers."""
        host = self._done()
        self.cached = host
        return self._failed(now, host)

    def on_unreachable(self, now: float) -> Event:
        """The host in `contact` did not answer: try another one at once, or give up
        until the next attempt."""
        host = self._done()
        if host == self.cached:
            self.cached = None
            self._discover(exclude=host)
        else:
            self._candidates.remove(host)
            self.contact = self._candidates[0] if self._candidates else None
        if self.contact is None:
            return self._failed(now, host)
        return Event(now, Kind.FAILOVER, self.state, host)

    def _discover(self, exclude: str | None) -> None:
        found = [h for h in self.discovery.candidates(self.rng) if h != exclude]
        self._candidates = list(dict.fromkeys(found))
        self.contact = self._candidates[0] if self._candidates else None

    def _done(self) -> str:
        host = self.contact
        if host is None:
            raise RuntimeError("no request was due: call poll first")
        self.contact = None
        return host

    def _failed(self, now: float, host: str | None = None) -> Event:
        if self.state == State.LICENSED:
            self.state = State.RENEWAL_DUE
        self._candidates = []
        self.contact = None
        self.next_attempt = now + self.activation_interval
        return Event(now, Kind.FAILED, self.state, host)
