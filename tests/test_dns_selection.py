"""RFC 2782 order, failover and the cached host (kmsclient.discovery), with a seeded random
source and fake DNS and hosts."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from kmsclient.activation import Result
from kmsclient.discovery import (
    CachedHost,
    Candidate,
    DnsError,
    HostCache,
    SrvRecord,
    find_host,
    order,
)
from kmsclient.outcome import Failure, Status
from kmsclient.target import Target

DRAWS = 20_000
# Chi-square critical values at p = 0.001 (a seeded run either passes or fails for good).
CHI2_001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}


def srv(target: str, priority: int = 0, weight: int = 0, port: int = 1688) -> Candidate:
    return Candidate(SrvRecord(priority, weight, port, target), (f"addr-of-{target}",), "lab.test")


def chi_square(observed: Counter[str], expected: dict[str, float]) -> float:
    return sum((observed[k] - e) ** 2 / e for k, e in expected.items())


def first_choices(records: list[Candidate], seed: int) -> Counter[str]:
    rng = random.Random(seed)
    return Counter(order(records, rng)[0].record.target for _ in range(DRAWS))


def test_first_choice_follows_the_weights() -> None:
    records = [srv("a", weight=10), srv("b", weight=20), srv("c", weight=70)]
    seen = first_choices(records, 1)
    expected = {"a": DRAWS * 0.1, "b": DRAWS * 0.2, "c": DRAWS * 0.7}
    assert chi_square(seen, expected) < CHI2_001[2], seen


def test_weight_zero_has_a_small_chance_among_weighted_records() -> None:
    # RFC 2782: the draw is in [0, sum]; a weight-0 record (placed first) wins only on 0.
    records = [srv("zero", weight=0), srv("a", weight=30), srv("b", weight=69)]
    seen = first_choices(records, 2)
    expected = {"zero": DRAWS / 100, "a": DRAWS * 30 / 100, "b": DRAWS * 69 / 100}
    assert chi_square(seen, expected) < CHI2_001[2], seen


def test_all_weights_zero_is_a_uniform_choice() -> None:
    records = [srv(name) for name in "abcd"]
    seen = first_choices(records, 3)
    assert chi_square(seen, dict.fromkeys("abcd", DRAWS / 4)) < CHI2_001[3], seen


def test_second_choice_is_drawn_from_what_remains() -> None:
    # After "c" (weight 70) is taken, "a" and "b" split 10:20.
    records = [srv("a", weight=10), srv("b", weight=20), srv("c", weight=70)]
    rng = random.Random(4)
    seen: Counter[str] = Counter()
    for _ in range(DRAWS):
        ordered = order(records, rng)
        if ordered[0].record.target == "c":
            seen[ordered[1].record.target] += 1
    total = sum(seen.values())
    assert chi_square(seen, {"a": total / 3, "b": total * 2 / 3}) < CHI2_001[1], seen


def test_priorities_are_strictly_respected() -> None:
    rng = random.Random(5)
    for _ in range(500):
        records = [
            srv(f"h{i}", priority=rng.choice((0, 1, 5, 10)), weight=rng.choice((0, 1, 100)))
            for i in range(8)
        ]
        ordered = order(records, rng)
        assert sorted(ordered, key=lambda c: c.record.target) == sorted(
            records, key=lambda c: c.record.target
        )
        priorities = [c.priority for c in ordered]
        assert priorities == sorted(priorities)


def test_a_heavy_weight_never_beats_a_lower_priority() -> None:
    records = [srv("backup", priority=10, weight=65535), srv("main", priority=0, weight=0)]
    seen = first_choices(records, 6)
    assert seen == Counter({"main": DRAWS})


def test_ignore_priority_keeps_the_answer_order() -> None:
    records = [srv("c", priority=9, weight=1), srv("a", priority=0, weight=100), srv("b")]
    assert order(records, random.Random(7), ignore_priority=True) == records


# Failover and the cached host.


class FakeResolver:
    """SRV records per domain and addresses per name, counting the queries."""

    def __init__(self, records: dict[str, list[Candidate]]) -> None:
        self.records = records
        self.srv_queries: list[str] = []

    async def srv(self, domain: str) -> list[Candidate]:
        self.srv_queries.append(domain)
        if domain not in self.records:
            raise DnsError(f"_vlmcs._tcp.{domain} SRV: SERVFAIL")
        return self.records[domain]

    async def addresses(self, name: str) -> tuple[str, ...]:
        for candidates in self.records.values():
            for c in candidates:
                if c.record.target == name:
                    return c.addresses
        return ()


class FakeHosts:
    """Answers for the addresses that are up; records every attempt."""

    def __init__(self, up: set[str], status: Status = Status.ACTIVATED) -> None:
        self.up = up
        self.status = status
        self.tried: list[str] = []

    async def __call__(self, target: Target) -> Result:
        self.tried.append(target.host)
        if target.host in self.up:
            return Result(target, None, self.status)  # type: ignore[arg-type]
        failure = Failure(Status.UNREACHABLE, "no listener", "connection refused")
        return Result(target, None, Status.UNREACHABLE, failure=failure)  # type: ignore[arg-type]


def lab(n: int = 6) -> dict[str, list[Candidate]]:
    return {"lab.test": [srv(f"kms{i}", priority=i % 2, weight=i) for i in range(n)]}


async def test_failover_walks_the_whole_list_once_in_order() -> None:
    resolver = FakeResolver(lab())
    hosts = FakeHosts(up=set())
    found = await find_host(["lab.test"], resolver, None, hosts, random.Random(8))  # type: ignore[arg-type]
    assert sorted(hosts.tried) == sorted(f"addr-of-kms{i}" for i in range(6))
    assert [a.host for a in found.attempts] == [t.removeprefix("addr-of-") for t in hosts.tried]
    priorities = [int(t[-1]) % 2 for t in hosts.tried]
    assert priorities == sorted(priorities)
    assert not found.answered
    assert found.result is not None and found.result.status == Status.UNREACHABLE


async def test_the_last_host_that_answers_is_found_and_cached(tmp_path: Path) -> None:
    cache = HostCache(tmp_path / "state" / "kms-host.json")
    hosts = FakeHosts(up={"addr-of-kms4"})
    found = await find_host(["lab.test"], FakeResolver(lab()), cache, hosts, random.Random(9))  # type: ignore[arg-type]
    assert found.answered and found.source == "dns"
    assert hosts.tried[-1] == "addr-of-kms4"
    assert cache.get(["lab.test"]) == CachedHost("kms4", 1688)


async def test_the_cached_host_is_used_without_asking_for_srv_records(tmp_path: Path) -> None:
    cache = HostCache(tmp_path / "kms-host.json")
    cache.put(["lab.test"], CachedHost("kms5", 1688))
    resolver = FakeResolver(lab())
    hosts = FakeHosts(up={f"addr-of-kms{i}" for i in range(6)})
    found = await find_host(["lab.test"], resolver, cache, hosts, random.Random(10))  # type: ignore[arg-type]
    assert found.source == "cache"
    assert hosts.tried == ["addr-of-kms5"]
    assert resolver.srv_queries == []
    assert cache.get(["lab.test"]) == CachedHost("kms5", 1688)


async def test_a_failed_cached_host_is_dropped_and_the_next_one_cached(tmp_path: Path) -> None:
    cache = HostCache(tmp_path / "kms-host.json")
    cache.put(["lab.test"], CachedHost("kms0", 1688))
    resolver = FakeResolver(lab())
    hosts = FakeHosts(up={f"addr-of-kms{i}" for i in range(1, 6)})
    found = await find_host(["lab.test"], resolver, cache, hosts, random.Random(11))  # type: ignore[arg-type]
    assert found.source == "dns"
    assert resolver.srv_queries == ["lab.test"]
    assert hosts.tried.count("addr-of-kms0") == 1  # not tried again after discovery
    assert hosts.tried[0] == "addr-of-kms0"
    answered = found.attempts[-1].host
    assert answered != "kms0"
    assert cache.get(["lab.test"]) == CachedHost(answered, 1688)


async def test_nothing_answers_the_cache_is_emptied(tmp_path: Path) -> None:
    cache = HostCache(tmp_path / "kms-host.json")
    cache.put(["lab.test"], CachedHost("kms0", 1688))
    found = await find_host(
        ["lab.test"],
        FakeResolver(lab()),  # type: ignore[arg-type]
        cache,
        FakeHosts(set()),
        random.Random(12),
    )
    assert not found.answered
    assert cache.get(["lab.test"]) is None


async def test_the_cache_is_kept_per_search_list(tmp_path: Path) -> None:
    cache = HostCache(tmp_path / "kms-host.json")
    cache.put(["lab.test"], CachedHost("kms1", 1688))
    cache.put(["other.test", "lab.test"], CachedHost("kms2", 1688))
    assert cache.get(["lab.test"]) == CachedHost("kms1", 1688)
    assert cache.get(["other.test", "lab.test"]) == CachedHost("kms2", 1688)
    assert cache.get(["other.test"]) is None
    (tmp_path / "kms-host.json").write_text("not json")
    assert cache.get(["lab.test"]) is None


async def test_suffixes_are_tried_in_order_past_a_failing_one() -> None:
    records = {"b.test": [srv("kms-b", weight=1)], "c.test": [srv("kms-c", weight=1)]}
    resolver = FakeResolver(records)
    hosts = FakeHosts(up={"addr-of-kms-c"})
    found = await find_host(
        ["a.test", "b.test", "c.test"],
        resolver,  # type: ignore[arg-type]
        None,
        hosts,
        random.Random(13),
    )
    assert resolver.srv_queries == ["a.test", "b.test", "c.test"]
    assert hosts.tried == ["addr-of-kms-b", "addr-of-kms-c"]
    assert found.answered
    assert any("a.test" in e and "SERVFAIL" in e for e in found.errors)


@pytest.mark.parametrize(
    ("status", "answered"),
    [
        (Status.ACTIVATED, True),
        (Status.BELOW_THRESHOLD, True),
        (Status.REFUSED, True),
        (Status.NOT_GENUINE, False),
    ],
)
async def test_which_replies_count_as_an_answering_host(status: Status, answered: bool) -> None:
    hosts = FakeHosts(up={"addr-of-kms0", "addr-of-kms1"}, status=status)
    records = {"lab.test": [srv("kms0", weight=1), srv("kms1", weight=1)]}
    found = await find_host(["lab.test"], FakeResolver(records), None, hosts, random.Random(14))  # type: ignore[arg-type]
    assert found.answered is answered
    assert len(hosts.tried) == (1 if answered else 2)
