"""The admin endpoint's test-double part: behaviour rules, the request journal and the clock.

    GET    /api/rules               the rules in force, in order
    POST   /api/rules               add rules: a JSON object (kmsd.rules keys) or an array
    DELETE /api/rules[?id=N]        remove one rule, or all
    GET    /api/journal?since=SEQ   journal entries (filters: client, cmid, workstation,
                                    product, answer, rule, limit)
    GET    /api/clock               the host's time
    POST   /api/clock               {"advance": SECONDS} or {"set": UNIX_TIME}

The functions here take the request's query and body and return what to answer as JSON;
kmsd.web does HTTP, the token and the Host check.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable
from uuid import UUID

from .journal import ANSWERS, Filter, Journal
from .rules import Rule, RuleError, RuleSet, parse_rule

MAX_ENTRIES = 10_000  # journal entries in one answer
API = "api"  # the origin of rules added over the admin endpoint


class Problem(Exception):
    """A request the endpoint refuses: HTTP `status` and a message for the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@runtime_checkable
class AdjustableClock(Protocol):
    def __call__(self) -> float: ...

    def advance(
        self, *, days: float = 0, hours: float = 0, minutes: float = 0, seconds: float = 0
    ) -> float: ...

    def set(self, unix: float) -> None: ...


Query = dict[str, list[str]]


def _one(query: Query, name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def _int(query: Query, name: str, low: int, high: int) -> int | None:
    text = _one(query, name)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise Problem(400, f"{name}: expected a whole number {low}..{high}, got {text!r}")
    return value


def journal_filter(query: Query) -> Filter:
    cmid = _one(query, "cmid")
    answer = _one(query, "answer")
    if answer is not None and answer not in ANSWERS:
        raise Problem(400, f"answer: expected one of {', '.join(ANSWERS)}, got {answer!r}")
    try:
        client_machine_id = UUID(cmid) if cmid is not None else None
    except ValueError:
        raise Problem(400, f"cmid: {cmid!r} is not a GUID") from None
    return Filter(
        since=_int(query, "since", 0, 2**63) or 0,
        client=_one(query, "client"),
        cmid=client_machine_id,
        workstation=_one(query, "workstation"),
        product=_one(query, "product"),
        answer=answer,
        rule=_one(query, "rule"),
        limit=_int(query, "limit", 1, MAX_ENTRIES) or MAX_ENTRIES,
    )


def read_journal(journal: Journal, query: Query) -> dict[str, Any]:
    """The entries the query asks for, and `next`: the cursor to pass as `since` next time
    (the last entry returned when `limit` cut the answer short, else the latest seq)."""
    where = journal_filter(query)
    entries = journal.entries(where)
    cut = where.limit is not None and len(entries) >= where.limit
    return {
        "entries": [e.to_json() for e in entries],
        "next": entries[-1].seq if cut else max(journal.total, where.since),
        "size": journal.size,
    }


def _body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Problem(400, f"the body is not JSON: {exc}") from None


def add_rules(rules: RuleSet, body: bytes, now: float, origin: str = API) -> list[dict[str, Any]]:
    """Add the rules of a JSON object or array, all or none."""
    data = _body(body)
    items = data if isinstance(data, list) else [data]
    parsed: list[Rule] = []
    for index, item in enumerate(items):
        where = f"rule {index + 1}: " if isinstance(data, list) else ""
        if not isinstance(item, dict):
            raise Problem(400, f"{where}expected a JSON object of rule keys")
        try:
            parsed.append(parse_rule(item, origin=origin))
        except RuleError as exc:
            raise Problem(400, f"{where}{exc}") from None
    try:
        rules.reserve(len(parsed))
    except RuleError as exc:
        raise Problem(409, str(exc)) from None
    return [rules.add(rule, now).describe() for rule in parsed]


def delete_rules(rules: RuleSet, query: Query) -> dict[str, Any]:
    rule_id = _int(query, "id", 1, 2**63)
    if rule_id is None:
        removed = len(rules)
        rules.clear()
        return {"removed": removed}
    if not rules.remove(rule_id):
        raise Problem(404, f"no rule {rule_id}")
    return {"removed": 1}


def read_clock(clock: Callable[[], float]) -> dict[str, Any]:
    now = clock()
    moment = dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="milliseconds")
    return {
        "now": now,
        "time": moment.replace("+00:00", "Z"),
        "adjustable": isinstance(clock, AdjustableClock),
    }


def set_clock(clock: Callable[[], float], body: bytes) -> dict[str, Any]:
    if not isinstance(clock, AdjustableClock):
        raise Problem(
            409, "this kmsd's clock cannot be set (it reads --clock-file, or changes are off)"
        )
    data = _body(body)
    if not isinstance(data, dict) or len(data) != 1 or not {"advance", "set"} & set(data):
        raise Problem(400, 'expected {"advance": SECONDS} or {"set": UNIX_TIME}')
    ((key, value),) = data.items()
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Problem(400, f"{key}: expected a number of seconds, got {value!r}")
    if key == "advance":
        clock.advance(seconds=value)
    elif 0 <= value < 253402300800:  # before year 10000
        clock.set(value)
    else:
        raise Problem(400, f"set: {value!r} is not a Unix time")
    return read_clock(clock)
