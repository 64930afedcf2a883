"""A simulated fleet's timeline as text for people and JSON for tools."""

from __future__ import annotations

import datetime as dt
from typing import Any

from ..licensing import DAY, HOUR
from .fleet import Sample, Timeline

SCHEMA = "kmsclient.simulate/1"


def at(offset: float) -> str:
    """An offset from the start as "2d 09:30" (day 0 is the first day)."""
    seconds = round(offset)
    days, rest = divmod(seconds, int(DAY))
    hours, rest = divmod(rest, int(HOUR))
    minutes, secs = divmod(rest, 60)
    text = f"{days}d {hours:02d}:{minutes:02d}"
    return text + f":{secs:02d}" if secs else text


def _when(offset: float | None) -> dict[str, Any] | None:
    if offset is None:
        return None
    return {"offset": offset, "day": int(offset // DAY), "at": at(offset)}


def to_json(timeline: Timeline) -> dict[str, Any]:
    scenario = timeline.scenario
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "scenario": scenario.name,
        "description": scenario.description,
        "mode": timeline.mode,
        "start": dt.datetime.fromtimestamp(scenario.start, dt.UTC).isoformat(),
        "days": scenario.duration / DAY,
        "clients": scenario.clients,
        "hosts": [h.name for h in scenario.hosts],
        "step_seconds": timeline.step,
        "totals": timeline.totals,
        "groups": [
            {
                "name": g.name,
                "product": g.product,
                "application": g.application,
                "threshold": g.threshold,
                "clients": g.clients,
                "first_activated": _when(g.first_activated),
                "all_licensed": _when(g.all_licensed),
                "licensed_at_end": g.licensed_at_end,
            }
            for g in timeline.groups
        ],
        "samples": [
            {
                "offset": s.offset,
                "licensed": s.licensed,
                "counts": s.counts,
                **{k: v for k, v in s.tallies.items() if v},
            }
            for s in timeline.samples
        ],
    }
    if timeline.events is not None:
        data["events"] = [
            {
                "client": e.client,
                "at": at(e.offset),
                "offset": e.offset,
                "event": e.kind.value,
                "state": e.state,
                "host": e.host,
                "count": e.count,
            }
            for e in timeline.events
        ]
    return data


def _row_key(sample: Sample) -> tuple[object, ...]:
    tallies = sample.tallies
    notable = ("activated", "refused", "failover", "failed", "expired", "joined", "left")
    return (
        tuple(sample.licensed.values()),
        tuple(sorted(sample.counts.items())),
        any(tallies[k] for k in notable),
    )


def to_text(timeline: Timeline) -> str:
    scenario = timeline.scenario
    lines = [
        f"Scenario   {scenario.name}: {scenario.description}".rstrip(": "),
        f"Run        {scenario.clients} clients, {len(scenario.hosts)} host(s) "
        f"({', '.join(h.name for h in scenario.hosts)}), {scenario.duration / DAY:g} days "
        f"from {dt.datetime.fromtimestamp(scenario.start, dt.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{timeline.mode}, {timeline.wall_seconds:.2f} s",
        "",
        "Group      product                              threshold  first activated  "
        "all licensed  licensed at end",
    ]
    for g in timeline.groups:
        first = at(g.first_activated) if g.first_activated is not None else "never"
        every = at(g.all_licensed) if g.all_licensed is not None else "never"
        lines.append(
            f"{g.name:<10} {g.product[:36]:<36} {g.threshold:>9}  {first:<15}  {every:<12}  "
            f"{g.licensed_at_end}/{g.clients}"
        )
    totals = timeline.totals
    lines += [
        "",
        "Totals     " + ", ".join(f"{k} {v}" for k, v in totals.items()),
        "",
    ]
    unit = "hour" if timeline.step < DAY else "day"
    groups = [g.name for g in timeline.groups]
    lines.append(
        f"Timeline   at the end of each {unit}; left out: rows that only repeat the previous "
        "one's\n           licensed clients and counts, with nothing but renewals and "
        "below-threshold answers;\n           per group: licensed clients; per period: requests, "
        "activations, renewals,\n           below-threshold answers, failed attempts and "
        "failovers, expirations"
    )
    header = f"{'at':<11} " + " ".join(f"{g[:10]:>10}" for g in groups)
    header += "   req  act  ren  below fail  exp  count last reported by host/application"
    lines.append(header)
    previous: tuple[object, ...] | None = None
    for sample in timeline.samples:
        key = _row_key(sample)
        if key[:2] == previous and not key[2]:
            continue
        previous = key[:2]
        t = sample.tallies
        row = f"{at(sample.offset):<11} "
        row += " ".join(f"{sample.licensed[g]:>10}" for g in groups)
        row += (
            f" {t['requests']:>5} {t['activated']:>4} {t['renewed']:>4} {t['below']:>6}"
            f" {t['failed'] + t['failover']:>4} {t['expired']:>4}  "
        )
        row += ", ".join(f"{k} {v}" for k, v in sorted(sample.counts.items()))
        lines.append(row.rstrip())
    return "\n".join(lines)
