"""Extended product IDs (ePIDs) of a KMS host and the host's HWID (docs/protocol.md,
"ePID and HWID")."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from .crypto import RandomSource
from .products import Csvlk

# ASCII digits only (\d would take any Unicode digit, which int() then reads), matched
# over the whole text (fullmatch: `$` would let a trailing newline through).
_EPID = re.compile(
    r"(?P<platform>[0-9]{5})-(?P<group>[0-9]{5})-(?P<key_hi>[0-9]{3})-(?P<key_lo>[0-9]{6})-03-"
    r"(?P<lcid>[0-9]{1,5})-(?P<build>[0-9]{4,5})\.0000-(?P<day>[0-9]{3})(?P<year>[0-9]{4})"
)
DEFAULT_LCID = 1033


def platform_id(build: int) -> int:
    """The ePID platform field of a host OS build."""
    if build <= 7601:
        return 55041
    if build <= 9200:
        return 5426
    if build <= 9600:
        return 6401
    return 3612


@dataclass(frozen=True, slots=True)
class Epid:
    platform: int
    group_id: int
    key_id: int
    lcid: int
    build: int
    activated: dt.date

    def __str__(self) -> str:
        day = self.activated.timetuple().tm_yday
        return (
            f"{self.platform:05d}-{self.group_id:05d}-{self.key_id // 10**6:03d}-"
            f"{self.key_id % 10**6:06d}-03-{self.lcid}-{self.build}.0000-"
            f"{day:03d}{self.activated.year:04d}"
        )


def parse_epid(text: str) -> Epid:
    """Parse and check an ePID's structure; raises ValueError naming what is wrong."""
    m = _EPID.fullmatch(text)
    if m is None:
        raise ValueError(
            f"ePID {text!r} does not have the form "
            "PPPPP-GGGGG-KKK-KKKKKK-03-LLLL-BBBBB.0000-DDDYYYY"
        )
    year, day = int(m["year"]), int(m["day"])
    if not 1 <= day <= (366 if year % 4 == 0 and (year % 100 or year % 400 == 0) else 365):
        raise ValueError(f"ePID {text!r} has day of year {day}")
    return Epid(
        int(m["platform"]),
        int(m["group"]),
        int(m["key_hi"]) * 10**6 + int(m["key_lo"]),
        int(m["lcid"]),
        int(m["build"]),
        dt.date(year, 1, 1) + dt.timedelta(days=day - 1),
    )


def _uniform(random: RandomSource, low: int, high: int) -> int:
    return low + int.from_bytes(random(8), "little") % (high - low + 1)


def generate_epid(
    csvlk: Csvlk, *, today: dt.date, random: RandomSource, lcid: int = DEFAULT_LCID
) -> Epid:
    """A plausible ePID of a host holding `csvlk`: a key id in its range and an activation
    date between the key's release and today."""
    first = min(csvlk.released, today)
    activated = first + dt.timedelta(days=_uniform(random, 0, (today - first).days))
    return Epid(
        platform_id(csvlk.host_build),
        csvlk.group_id,
        _uniform(random, csvlk.key_id_min, csvlk.key_id_max),
        lcid,
        csvlk.host_build,
        activated,
    )
