"""Behaviour rules: parsing with clear errors, order and expiry (on the wire:
tests/test_double.py). Fuzzed with hypothesis, derandomized."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsd import config
from kmsd.protocol.client import base_request
from kmsd.protocol.products import products
from kmsd.rules import KEYS, MAX_DELAY, RuleError, RuleSet, parse_rule

_WIN = products().sku_by_name("Windows 10/11 Enterprise")
assert _WIN is not None
WIN = _WIN


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"produkt": "x"}, "unknown key 'produkt'"),
        ({"product": "Windows 99"}, "product: unknown product 'Windows 99'; closest:"),
        ({"application": "Linux"}, "application: unknown application 'Linux'"),
        ({"kms_id": "nope"}, "kms_id: unknown product 'nope'"),
        ({"cmid": "xyz"}, "cmid: 'xyz' is not a GUID"),
        ({"protocol": 7}, "protocol: expected 4, 5 or 6"),
        ({"client": "10.0.0.300"}, "client: '10.0.0.300' is not an address or network"),
        ({"hresult": "NOPE"}, "hresult: expected one of S_OK, INVALID_DATA"),
        ({"hresult": 0}, "hresult: 0 is success"),
        ({"hresult": "0x1FFFFFFFF"}, "hresult: expected one of"),
        ({"fault": "BUSY"}, "fault: expected one of PROTO_ERROR"),
        ({"hresult": "INVALID_DATA", "close": True}, "hresult and close"),
        ({"hresult": "INVALID_DATA", "count": 3}, "count: applies to a reply, not with hresult"),
        ({"close": 1}, "close: expected true"),
        ({"delay": MAX_DELAY + 1}, "delay: expected seconds, more than 0 and at most 300"),
        ({"delay": float("nan")}, "delay: expected seconds"),
        ({"count": -1}, "count: expected a whole number or 'threshold-1'"),
        ({"count": True}, "count: expected a whole number"),
        ({"count": "threshold"}, "count: expected a whole number or 'threshold-1'"),
        ({"tamper": "crc"}, "tamper: unknown check 'crc'"),
        ({"tamper": "hmac", "protocol": 4}, "tamper: a V4 reply has no 'hmac' check"),
        ({"epid": "x" * 64}, "epid: longer than 63"),
        ({"hwid": "00112233"}, "hwid: '00112233': HWID must be 16 hex digits"),
        ({"bind_nak": 2, "product": "Windows 10/11 Enterprise"}, "product: a bind_nak"),
        ({"bind_nak": 2, "delay": 1}, "delay: a bind_nak"),
        ({"bind_nak": 70000}, "bind_nak: reason 70000 is not 16-bit"),
        ({"times": 0}, "times: expected a whole number 1.."),
        ({"seconds": -5}, "seconds: expected seconds"),
        ({"name": ""}, "name: expected a non-empty string"),
        ({"renewal_interval": 2**32}, "renewal_interval: expected a whole number 0..4294967295"),
    ],
)
def test_errors_name_the_key(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(RuleError) as caught:
        parse_rule(spec)
    assert str(caught.value).startswith(message), str(caught.value)


def test_names_resolve_as_the_cli_does() -> None:
    rule = parse_rule(
        {
            "product": "windows 10/11 enterprise",
            "application": "WINDOWS",
            "kms_id": "Windows 10/11 (Volume)",
            "hresult": "kms_id_mismatch",
            "protocol": "6.0",
            "client": "10.1.2.3/8",
        }
    )
    assert rule.match.sku == WIN.id.bytes_le
    assert rule.match.application == WIN.kms.application.id.bytes_le
    assert rule.match.kms_id == WIN.kms.id.bytes_le
    assert rule.match.protocols == frozenset({6})
    assert rule.response.hresult == 0xC004F042
    assert rule.spec["hresult"] == "0xC004F042" and rule.spec["client"] == "10.0.0.0/8"


def test_tamper_narrows_the_protocols() -> None:
    assert parse_rule({"tamper": "hash"}).match.protocols == frozenset({5, 6})
    assert parse_rule({"tamper": "hash", "protocol": 6}).match.protocols == frozenset({6})


def test_order_times_and_window() -> None:
    rules = RuleSet()
    first = rules.add(parse_rule({"count": 1, "times": 1}), now=0)
    second = rules.add(parse_rule({"count": 2, "seconds": 10, "name": "window"}), now=0)
    base = base_request(WIN)
    assert rules.match(base, "127.0.0.1", 1) is first
    assert rules.match(base, "127.0.0.1", 2) is second
    assert rules.match(base, "127.0.0.1", 10) is None  # the window ended at 10
    assert not rules and second.used == 1 and second.name == "window" and first.name == "rule 1"


def test_bind_rules_are_kept_apart() -> None:
    rules = RuleSet()
    rules.add(parse_rule({"bind_nak": 2, "client": "10.0.0.0/8"}), now=0)
    assert rules.binds == 1
    assert rules.match(base_request(WIN), "10.0.0.1", 0) is None  # never for a request
    assert rules.match_bind("127.0.0.1", 0) is None
    assert rules.match_bind("10.1.1.1", 0) is not None
    rules.clear()
    assert rules.binds == 0


def test_workstation_glob_is_case_insensitive() -> None:
    rule = parse_rule({"workstation": "LAB-??.*"})
    assert rule.match.matches(base_request(WIN, workstation="lab-07.example"), "")
    assert not rule.match.matches(base_request(WIN, workstation="lab-7.example"), "")


VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True),
    st.text(max_size=80),
    st.sampled_from(
        [
            "Windows",
            "Windows 10/11 Enterprise",
            "threshold-1",
            "hmac",
            "0xC004F042",
            "127.0.0.0/8",
            "6",
            str(uuid.UUID(int=7)),
            "0011223344556677",
            "SERVER_TOO_BUSY",
        ]
    ),
    st.lists(st.integers(), max_size=2),
)
SPECS = st.dictionaries(st.sampled_from([*KEYS, "bogus"]), VALUES, max_size=6)


@settings(derandomize=True, max_examples=2000, deadline=None)
@given(SPECS)
def test_fuzz_a_rule_parses_or_is_refused_clearly(spec: dict[str, Any]) -> None:
    """Any table parses into a rule or raises RuleError, and a parsed rule's canonical
    form parses into the same rule."""
    try:
        rule = parse_rule(spec)
    except RuleError as exc:
        assert str(exc)
        return
    again = parse_rule(rule.spec)
    assert (again.match, again.response, again.spec) == (rule.match, rule.response, rule.spec)


def test_rule_text_keeps_text_that_looks_like_a_number() -> None:
    spec = {"name": "0", "workstation": "42", "count": 3, "delay": 0.5}
    assert config.rule_from_text(config.rule_text(spec)) == spec


@settings(derandomize=True, max_examples=1000, deadline=None)
@given(st.lists(SPECS, min_size=1, max_size=3))
def test_fuzz_rule_tables_through_the_configuration_parser(tables: list[dict[str, Any]]) -> None:
    """[[rule]] tables as kmsd.config reads them: each is taken in canonical form or
    refused with a ValueError (which read_file reports under host.rule)."""
    option = config.BY_NAME["rule"]
    try:
        specs = config._from_toml(option, tables)
    except ValueError as exc:
        assert str(exc)
        return
    assert [parse_rule(spec).spec for spec in specs] == specs
    assert [config.rule_from_text(option.show(spec)) for spec in specs] == specs
