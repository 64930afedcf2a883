"""The pytest plugin's own behaviour, in pytest runs of their own (pytester): found through
its entry point, one host per test, session hosts shared and reset, several hosts at once,
and nothing left behind (threads, sockets) once the session ends."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

CHECKS = """
import asyncio, os, threading

import pytest

from kmsclient.activation import activate
from kmsd.protocol.client import base_request, prepare
from kmsclient.target import parse_target
from kmsd.protocol.products import products

SKU = products().sku_by_name("Windows 10/11 Enterprise")


def count(host):
    result = asyncio.run(activate(parse_target(host.target), prepare(base_request(SKU))))
    return result.verified.reply.base.count


SEEN = []


@pytest.mark.parametrize("round", [1, 2])
def test_each_test_has_its_own_host(kms_host, round):
    assert kms_host.journal == [] and count(kms_host) == 1
    SEEN.append(kms_host.port)
    kms_host.rule(count=25)


def test_the_two_hosts_were_different():
    assert len(set(SEEN)) == 2


@pytest.mark.parametrize("round", [1, 2])
def test_session_hosts_are_shared_and_reset(kms_hosts, round):
    a, b = kms_hosts(2)
    assert a.port != b.port
    assert a.current_rules() == [] and b.journal == []
    assert count(a) == 1 and count(b) == 1 and count(b) == 2
    a.rule(count=25)
"""

LEAKS = """
import os, threading

BEFORE = {}


def sockets():
    fds = os.listdir("/proc/self/fd")
    links = []
    for fd in fds:
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return sum(link.startswith("socket:") for link in links)


def pytest_sessionstart(session):
    BEFORE["threads"] = threading.active_count()
    BEFORE["sockets"] = sockets()


def pytest_unconfigure(config):
    # after the session fixtures' teardown
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    fds = sockets()
    with open(os.environ["LEAK_REPORT"], "w") as report:
        report.write(f"{threading.active_count() - BEFORE['threads']} {fds - BEFORE['sockets']} "
                     f"{threads}")
"""


def test_fixtures_isolation_sharing_and_no_leaks(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = pytester.path / "leaks.txt"
    monkeypatch.setenv("LEAK_REPORT", str(report))
    pytester.makeconftest(LEAKS)
    pytester.makepyfile(test_checks=CHECKS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=5)
    threads, sockets, names = report.read_text().split(" ", 2)
    assert (threads, sockets) == ("0", "0"), names


def test_dns_fixture_and_parallel_hosts(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_dns="""
import asyncio
from kmsclient.discovery import Resolver, parse_nameserver


def test_dns(kms_hosts, kms_dns):
    hosts = kms_hosts(3)
    dns = kms_dns(*hosts, priorities=[5, 5, 0])
    records = asyncio.run(Resolver([parse_nameserver(dns.nameserver)]).srv(dns.zone))
    assert sorted((r.priority, r.record.port) for r in records) == sorted(
        [(5, hosts[0].port), (5, hosts[1].port), (0, hosts[2].port)]
    )
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=1)


def test_plugin_is_registered_by_the_install(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*kms_host*", "*kms_hosts*", "*kms_dns*"])
