"""Fleet simulation benchmark: a year of a 10,000-client network in virtual time.

Runs scenarios/fleet-10k.toml (or --scenario) against kmsd's host logic in this process and
prints the wall time, exchanges per second and peak RSS; --budget SECONDS makes it exit 1
when the run takes longer (the target: 60 s). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kmsclient.sim.fleet import InProcess, simulate  # noqa: E402
from kmsclient.sim.scenario import load  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", type=Path, default=ROOT / "scenarios" / "fleet-10k.toml")
    parser.add_argument("--wire", action="store_true", help="encode and verify every exchange")
    parser.add_argument("--budget", type=float, help="exit 1 when the run takes longer (s)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    scenario = load(args.scenario)
    began = time.perf_counter()
    transport = InProcess(scenario, wire=args.wire)
    result = asyncio.run(simulate(scenario, transport))
    wall = time.perf_counter() - began
    exchanges = result.totals["requests"]
    report = {
        "scenario": scenario.name,
        "mode": result.mode,
        "clients": scenario.clients,
        "days": scenario.duration / 86400,
        "wall_seconds": round(wall, 3),
        "exchanges": exchanges,
        "exchanges_per_second": round(exchanges / wall),
        "virtual_days_per_second": round(scenario.duration / 86400 / wall, 1),
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "totals": result.totals,
        "budget_seconds": args.budget,
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(
            f"{scenario.name}: {scenario.clients} clients x {report['days']:g} days "
            f"({result.mode}) in {wall:.2f} s: {exchanges} exchanges "
            f"({report['exchanges_per_second']}/s), peak RSS {report['peak_rss_kib'] // 1024} MiB"
        )
        print("totals: " + ", ".join(f"{k} {v}" for k, v in result.totals.items()))
    if args.budget is not None and wall > args.budget:
        print(f"over budget: {wall:.2f} s > {args.budget:g} s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
