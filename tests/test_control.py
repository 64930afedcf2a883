"""kmsd as a test double from outside Python: [[rule]] tables in kmsd.toml, the admin
endpoint's /api/rules, /api/journal and /api/clock with the bearer token, `kmsd journal`,
and SIGHUP. A real daemon (subprocess), driven over HTTP and checked on the wire by
kmsclient's strict client. The endpoint's rule and journal parsing is fuzzed."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsclient.activation import activate
from kmsclient.outcome import Status
from kmsclient.target import Target
from kmsd import config
from kmsd.clock import VirtualClock
from kmsd.control import Problem, add_rules, read_journal, set_clock
from kmsd.journal import Journal, record_of
from kmsd.protocol.client import base_request, prepare
from kmsd.protocol.products import products
from kmsd.rules import RuleSet
from tests.conftest import KmsdProcess, start_kmsd, stop_kmsd

TOKEN = "0123456789abcdef0123456789abcdef"
WIN = products().sku_by_name("Windows 10/11 Enterprise")
assert WIN is not None
CONFIG = """
[network]
admin_token_file = "{token}"

[[rule]]
name = "from the file"
product = "Windows 10/11 Enterprise"
count = 25
"""


def call(kmsd: KmsdProcess, **fields: Any) -> Any:
    assert WIN is not None
    prepared = prepare(base_request(WIN, **fields))
    return asyncio.run(activate(Target(kmsd.host, kmsd.port), prepared))


def admin_address(kmsd: KmsdProcess) -> tuple[str, int]:
    [entry] = [e for e in kmsd.log if e.get("event") == "admin endpoint"]
    host, _, port = str(entry["address"]).rpartition(":")
    return host, int(port)


def admin(
    kmsd: KmsdProcess,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = TOKEN,
    host: str | None = None,
) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(*admin_address(kmsd), timeout=10)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if host is not None:
        headers["Host"] = host
    data = None if body is None else json.dumps(body).encode()
    try:
        conn.request(method, path, data, headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.fixture
def double(tmp_path: Path) -> Iterator[KmsdProcess]:
    """kmsd with the admin endpoint, a token and one [[rule]] from its configuration file."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    file = tmp_path / "kmsd.toml"
    file.write_text(CONFIG.format(token=token_file))
    kmsd = start_kmsd("--admin", "127.0.0.1:0", "--config", str(file))
    yield kmsd
    stop_kmsd(kmsd)


def test_rules_from_the_file_and_the_api(double: KmsdProcess) -> None:
    assert call(double).verified.reply.base.count == 25
    status, rules = admin(double, "GET", "/api/rules", token=None)
    assert status == 200
    assert [(r["name"], r["origin"], r["used"]) for r in rules] == [("from the file", "config", 1)]

    rule = {"product": "Windows 10/11 Enterprise", "hresult": "KMS_ID_MISMATCH", "times": 1}
    assert admin(double, "POST", "/api/rules", rule, token=None)[0] == 401
    assert admin(double, "POST", "/api/rules", rule, token="x" * 32)[0] == 403
    assert admin(double, "POST", "/api/rules", rule, host="kms.evil.example")[0] == 421
    status, refused = admin(double, "POST", "/api/rules", {"hresult": "NOPE"})
    assert status == 400 and refused["error"].startswith("hresult: expected one of S_OK")
    status, added = admin(double, "POST", "/api/rules", [rule])
    assert status == 201 and added[0]["origin"] == "api" and added[0]["times_left"] == 1
    # A test's rule goes ahead of the file's (the baseline), and goes after one use.
    order = [(r["origin"], r["used"]) for r in admin(double, "GET", "/api/rules")[1]]
    assert order == [("api", 0), ("config", 1)]
    result = call(double)
    assert result.status == Status.REFUSED and result.failure.hresult == 0xC004F042
    assert call(double).verified.reply.base.count == 25
    assert admin(double, "DELETE", f"/api/rules?id={rules[0]['id']}") == (200, {"removed": 1})
    assert admin(double, "GET", "/api/rules")[1] == []
    assert admin(double, "DELETE", "/api/rules?id=99") == (404, {"error": "no rule 99"})


def test_journal_over_http_and_kmsd_journal(double: KmsdProcess) -> None:
    call(double, workstation="ws-1")
    call(double, workstation="ws-2")
    status, page = admin(double, "GET", "/api/journal?limit=1", token=None)
    assert status == 200 and [e["seq"] for e in page["entries"]] == [1] and page["next"] == 1
    page = admin(double, "GET", f"/api/journal?since={page['next']}")[1]
    assert [e["request"]["workstation"] for e in page["entries"]] == ["ws-2"]
    assert page["entries"][0]["rule"] == "from the file" and page["next"] == 2
    assert admin(double, "GET", "/api/journal?cmid=nope")[0] == 400

    host, port = admin_address(double)
    command = [sys.executable, "-m", "kmsd", "journal", "--admin", f"{host}:{port}"]
    done = subprocess.run([*command, "--json", "--workstation", "WS-2"], capture_output=True)
    lines = done.stdout.decode().splitlines()
    assert done.returncode == 0 and [json.loads(line)["seq"] for line in lines] == [2]
    table = subprocess.run(command, capture_output=True, text=True).stdout.splitlines()
    assert table[0].split() == ["SEQ", "TIME", "CLIENT", "PRODUCT", "WORKSTATION", "ANSWER", "RULE"]
    assert "count 25" in table[2] and "ws-2" in table[2]


def test_clock_over_http(double: KmsdProcess) -> None:
    admin(double, "DELETE", "/api/rules")
    for _ in range(3):
        call(double)
    before = admin(double, "GET", "/api/clock", token=None)[1]
    assert before["adjustable"] is True
    assert admin(double, "POST", "/api/clock", {"advance": 31 * 86400}, token=None)[0] == 401
    status, after = admin(double, "POST", "/api/clock", {"advance": 31 * 86400})
    assert status == 200 and after["now"] - before["now"] >= 31 * 86400
    assert call(double).verified.reply.base.count == 1  # the three have expired


def test_changes_are_off_without_a_token(kmsd_process: KmsdProcess) -> None:
    kmsd = start_kmsd("--admin", "127.0.0.1:0")
    try:
        status, body = admin(kmsd, "POST", "/api/rules", {"count": 25})
        assert status == 403 and "off" in body["error"]
        assert admin(kmsd, "POST", "/api/clock", {"advance": 1})[0] == 403
        assert admin(kmsd, "GET", "/api/clock")[1]["adjustable"] is False
        assert admin(kmsd, "PUT", "/api/rules")[0] == 405
    finally:
        stop_kmsd(kmsd)


def test_reload_replaces_the_files_rules_and_keeps_the_apis(
    double: KmsdProcess, tmp_path: Path
) -> None:
    admin(double, "POST", "/api/rules", {"workstation": "api-*", "count": 3})
    file = tmp_path / "kmsd.toml"
    file.write_text(file.read_text().replace("count = 25", "count = 24"))
    double.process.send_signal(signal.SIGHUP)
    double.read_log_until("configuration reloaded")
    rules = admin(double, "GET", "/api/rules")[1]
    assert [(r["origin"], r.get("count")) for r in rules] == [("api", 3), ("config", 24)]
    assert call(double).verified.reply.base.count == 24


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[rule]]\nproduct = "Windows 99"\n', "host.rule: product: unknown product 'Windows 99'"),
        ("[[rule]]\nhresult = 0\n", "host.rule: hresult: 0 is success"),
        ("[[rule]]\nbogus = 1\n", "host.rule: unknown key 'bogus'"),
        (
            '[network]\nadmin_token_file = "/nonexistent/token"\nadmin = "127.0.0.1:0"\n',
            "cannot read",
        ),
    ],
)
def test_configuration_errors_are_clear(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "kmsd.toml"
    file.write_text(text)
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(")):
        config.load({"config": str(file)})


def test_rule_on_the_command_line() -> None:
    spec = config.rule_from_text("product='Windows 10/11 Enterprise' count=threshold-1 times=2")
    assert spec == {"product": "Windows 10/11 Enterprise", "count": "threshold-1", "times": 2}
    assert config.rule_from_text(config.rule_text(spec)) == spec
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        config.rule_from_text("count")


# Fuzzed: whatever arrives at /api/rules and /api/journal is taken or refused with 4xx.

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=8,
)
RULE_KEYS = st.sampled_from(["product", "hresult", "count", "times", "tamper", "client", "x"])
RULE_BODIES = st.one_of(
    JSON.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(RULE_KEYS, JSON, max_size=4).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40),
)


@settings(derandomize=True, max_examples=1000, deadline=None)
@given(RULE_BODIES)
def test_fuzz_api_rules(body: bytes) -> None:
    rules = RuleSet()
    try:
        added = add_rules(rules, body, now=0.0)
    except Problem as exc:
        assert exc.status in (400, 409) and exc.message
        assert len(rules) == 0  # all or none
        return
    assert len(rules) == len(added)
    json.dumps(added)


QUERY_KEYS = st.sampled_from(
    ["since", "limit", "client", "cmid", "workstation", "product", "answer", "rule", "x"]
)


@settings(derandomize=True, max_examples=500, deadline=None)
@given(st.dictionaries(QUERY_KEYS, st.lists(st.text(max_size=20), min_size=1, max_size=2)))
def test_fuzz_api_journal(query: dict[str, list[str]]) -> None:
    journal = Journal(5)
    for i in range(8):
        request = base_request(WIN, workstation=f"ws-{i}") if WIN is not None else None
        journal.add(record_of(float(i), f"127.0.0.{i}:1000", i, False, request, "count", i))
    try:
        page = read_journal(journal, query)
    except Problem as exc:
        assert exc.status == 400 and exc.message
        return
    json.dumps(page)
    assert all(3 <= e["seq"] <= 8 for e in page["entries"])


def test_set_clock_refuses_what_is_not_a_time() -> None:
    clock = VirtualClock(1000.0)
    assert set_clock(clock, b'{"set": 2000}')["now"] == 2000.0
    for body in (b'{"advance": "1"}', b'{"set": -1}', b"[]", b'{"advance": 1, "set": 2}'):
        with pytest.raises(Problem):
            set_clock(clock, body)
    with pytest.raises(Problem, match="cannot be set"):
        set_clock(lambda: 0.0, b'{"advance": 1}')


def test_the_container_recipe_fits_together(tmp_path: Path) -> None:
    """deploy/testing: the compose file's mounts exist, its secret is where kmsd.toml looks
    for the token, and kmsd.toml (with its [[rule]]) is a valid configuration."""
    recipe = Path(__file__).resolve().parent.parent / "deploy" / "testing"
    service = yaml.safe_load((recipe / "compose.yaml").read_text())["services"]["kmsd"]
    [mount] = service["volumes"]
    source, target, _ = mount.split(":")
    assert (recipe / source).is_file() and service["command"] == ["--config", target]
    [secret] = service["secrets"]
    toml = (recipe / "kmsd.toml").read_text()
    assert f'admin_token_file = "/run/secrets/{secret}"' in toml
    token = tmp_path / "token"
    token.write_text(TOKEN)
    file = tmp_path / "kmsd.toml"
    file.write_text(toml.replace(f"/run/secrets/{secret}", str(token)))
    _, built = config.load({"config": str(file)})
    assert built.admin_token == TOKEN and built.admin == ("0.0.0.0", 9688)
    assert [r["name"] for r in built.host.rules] == ["windows activates"]
