"""The request journal: the last N exchanges the host answered, for tests to assert on.

Recording costs one small object per exchange, made of values the server has already
built (the decoded request is kept as it is); names, times and JSON are made only when
someone reads (/api/journal, `kmsd journal`, kmsd.testing).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import ipaddress
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from .protocol.constants import unix_time
from .protocol.errors import FaultStatus, HResult
from .protocol.kms import BaseRequest, guid_text, product_uuid
from .protocol.products import products
from .protocol.rpc import NakReason

DEFAULT_SIZE = 10_000

# What the host answered (Entry.answer); Entry.value holds the count, HRESULT, fault
# status or bind_nak reason.
COUNT = "count"
HRESULT = "hresult"
FAULT = "fault"
BIND_NAK = "bind_nak"
CLOSE = "close"
ANSWERS = (COUNT, HRESULT, FAULT, BIND_NAK, CLOSE)


# A record, as the server appends it: a list, the cheapest thing to build, which the server
# completes with the reply's latency once the reply has left.
Record = list[Any]
LATENCY = 9  # the record's last item


def record_of(
    time: float,
    peer: str,
    call_id: int,
    ndr64: bool,
    request: BaseRequest | None,
    answer: str,
    value: int,
    rule: str | None = None,
    reason: str | None = None,
) -> Record:
    return [time, peer, call_id, ndr64, request, answer, value, rule, reason, None]


@dataclass(frozen=True, slots=True)
class Entry:
    """One exchange, as a reader sees it. `time`: the host's clock (maybe virtual);
    `value`: the count, HRESULT, fault status or bind_nak reason, as `answer` says;
    `latency`: seconds from the complete request to its reply leaving (None until it has,
    or if none did)."""

    seq: int
    time: float
    peer: str
    call_id: int
    ndr64: bool
    request: BaseRequest | None
    answer: str
    value: int
    rule: str | None
    reason: str | None
    latency: float | None

    def __repr__(self) -> str:
        return f"<Entry {self.seq} {self.peer} {self.product} {self.answer} {self.value}>"

    @property
    def count(self) -> int | None:
        return self.value if self.answer == COUNT else None

    @property
    def hresult(self) -> int | None:
        return self.value if self.answer == HRESULT else None

    @property
    def address(self) -> str:
        """The client's IP address (peer without the port)."""
        host = self.peer.rpartition(":")[0] or self.peer
        return host.strip("[]")

    @property
    def product(self) -> str | None:
        base = self.request
        if base is None:
            return None
        return products().product_name(
            product_uuid(base.sku_id), product_uuid(base.kms_id), product_uuid(base.application_id)
        )

    @property
    def application(self) -> str | None:
        base = self.request
        if base is None:
            return None
        app = products().applications.get(product_uuid(base.application_id))
        return app.name if app else guid_text(base.application_id)

    @property
    def client_machine_id(self) -> UUID | None:
        base = self.request
        return None if base is None else UUID(bytes_le=base.client_machine_id)

    @property
    def workstation(self) -> str | None:
        return None if self.request is None else self.request.workstation

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "seq": self.seq,
            "time": _iso(self.time),
            "peer": self.peer,
            "rpc": {"call_id": self.call_id, "ndr": "NDR64" if self.ndr64 else "NDR32"},
            "request": None,
            "answer": {"kind": self.answer, **_value(self.answer, self.value)},
            "rule": self.rule,
            "reason": self.reason,
            "latency_ms": None if self.latency is None else round(self.latency * 1000, 3),
        }
        base = self.request
        if base is not None:
            item = products().kms_items.get(product_uuid(base.kms_id))
            out["request"] = {
                "protocol": f"{base.major}.{base.minor}",
                "application": self.application,
                "application_id": guid_text(base.application_id),
                "product": self.product,
                "sku_id": guid_text(base.sku_id),
                "kms_id": guid_text(base.kms_id),
                "kms_group": item.name if item else None,
                "client_machine_id": base.cmid_text,
                "previous_client_machine_id": guid_text(base.previous_client_machine_id),
                "workstation": base.workstation,
                "vm": bool(base.is_vm),
                "license_status": base.license_status,
                "binding_expiration": base.binding_expiration,
                "required_count": base.required_count,
                "request_time": _iso(unix_time(base.request_time)),
            }
        return out


def _iso(unix: float) -> str | None:
    try:
        moment = dt.datetime.fromtimestamp(unix, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return None  # a client's request time can be anything
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _value(answer: str, value: int) -> dict[str, Any]:
    if answer == COUNT:
        return {"count": value}
    names: dict[str, type[HResult] | type[FaultStatus] | type[NakReason]] = {
        HRESULT: HResult,
        FAULT: FaultStatus,
        BIND_NAK: NakReason,
    }
    kind = names.get(answer)
    if kind is None:
        return {}
    name = kind(value).name if value in kind._value2member_map_ else None
    return {"code": f"0x{value:08X}", "name": name}


@dataclass(frozen=True)
class Filter:
    """Which entries to read; every field given must hold."""

    since: int = 0  # only entries with a larger seq (a cursor: the last seq read)
    client: str | None = None  # address or network
    cmid: UUID | None = None
    workstation: str | None = None  # glob, case-insensitive
    product: str | None = None  # case-insensitive substring of the product name
    answer: str | None = None  # count, hresult, fault, bind_nak, close
    rule: str | None = None
    limit: int | None = None  # at most this many, the oldest first
    _cmid: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # compared with each entry's client machine ID as sent
        if self.cmid is not None:
            object.__setattr__(self, "_cmid", self.cmid.bytes_le)

    def keeps(self, entry: Entry) -> bool:
        if entry.seq <= self.since:
            return False
        if self.answer is not None and entry.answer != self.answer:
            return False
        if self.rule is not None and entry.rule != self.rule:
            return False
        if self.client is not None:
            try:
                network = ipaddress.ip_network(self.client, strict=False)
                if ipaddress.ip_address(entry.address) not in network:
                    return False
            except ValueError:
                return False
        if self._cmid is not None and (
            entry.request is None or entry.request.client_machine_id != self._cmid
        ):
            return False
        if self.workstation is not None:
            name = entry.workstation
            if name is None or not fnmatch.fnmatchcase(
                name.casefold(), self.workstation.casefold()
            ):
                return False
        if self.product is not None:
            product = entry.product
            if product is None or self.product.casefold() not in product.casefold():
                return False
        return True


class Journal:
    """A ring of the last `size` exchanges (0: record nothing). Not thread-safe: the
    server's loop writes it; read it there too."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self.size = size
        self.ring: deque[Record] = deque(maxlen=size)
        self.total = 0  # records ever added: the seq of the latest

    def add(self, record: Record) -> Record:
        self.total += 1
        self.ring.append(record)
        return record

    def __len__(self) -> int:
        return len(self.ring)

    def clear(self) -> None:
        """Forget the records; sequence numbers go on (a reader's cursor stays valid)."""
        self.ring.clear()

    def entries(self, where: Filter | None = None) -> list[Entry]:
        """The entries `where` keeps (default: all), oldest first."""
        where = where or Filter()
        first = self.total - len(self.ring) + 1  # seq of ring[0]
        out: list[Entry] = []
        start = max(where.since - first + 1, 0)
        for seq, record in enumerate(itertools.islice(self.ring, start, None), first + start):
            entry = Entry(seq, *record)
            if where.keeps(entry):
                out.append(entry)
                if where.limit is not None and len(out) >= where.limit:
                    break
        return out
