#!/usr/bin/env python3
"""A small "tool under test": activate this machine's product against KMS and report.

    activation_check.py [--host HOST:PORT | --domain SUFFIX [--nameserver IP:PORT]]
                        [--product NAME] [--state FILE]

It runs `kmsclient activate --json` and prints one line a person or a monitoring system
reads: ACTIVATED, NOT ACTIVATED (count below threshold), REFUSED, UNREACHABLE or
NOT GENUINE, with the host that answered. Exit status: 0 activated, 1 anything else.
It stands for the deployment scripts and configuration-management roles that the kmsd
pytest plugin is meant to test (see tests/test_example_tool.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", help="the KMS host; without it, DNS discovery")
    parser.add_argument("--domain", help="DNS suffix to look for _vlmcs._tcp under")
    parser.add_argument("--nameserver", help="DNS server to ask")
    parser.add_argument("--product", default="Windows 10/11 Enterprise")
    parser.add_argument("--state", help="where kmsclient keeps the host that answered")
    args = parser.parse_args()

    command = ["kmsclient", "activate", "--json", "--product", args.product]
    if args.host:
        command.append(args.host)
    for option in ("domain", "nameserver", "state"):
        if getattr(args, option):
            command += [f"--{option}", getattr(args, option)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        print(f"ERROR kmsclient failed: {done.stderr.strip()}")
        return 1
    status, host = report["status"], report.get("host")
    error = report.get("error") or {}
    if status == "activated":
        print(f"ACTIVATED by {host} (count {report['response']['count']})")
        return 0
    if status == "below_threshold":
        response = report["response"]
        print(f"NOT ACTIVATED by {host}: count {response['count']} of {response['required_count']}")
    elif status == "refused":
        print(f"REFUSED by {host}: {error.get('hresult') or error.get('message')}")
    elif status == "not_genuine":
        print(f"NOT GENUINE reply from {host}: failed check {error.get('check')}")
    else:
        print(f"UNREACHABLE: {error.get('message')}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
