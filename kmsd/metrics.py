"""What the daemon counts for its admin endpoint (kmsd.web): activations, errors,
connections, reply latency and recent activations, rendered in Prometheus' text format.

The per-request path only increments ints in dicts keyed by small tuples of strings it
already has; names, label escaping and cumulative buckets are made when scraped. Every
label set is bounded: applications and products outside the product database collapse
into "unknown", error codes come from the protocol's own enums, refusal reasons from the
admission control's few kinds.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .limits import Refusal
from .protocol.errors import FaultStatus, HResult
from .protocol.kms import SUPPORTED_MAJORS
from .protocol.products import ProductDatabase, products
from .protocol.rpc import BindNak, Fault, NakReason

UNKNOWN = "unknown"
RECENT = 50  # activations kept for the status page
# Reply latency buckets, seconds: a reply waits for its group commit (about a millisecond).
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

_FAULTS = {int(s): s.name for s in FaultStatus}
_NAKS = {int(r): r.name for r in NakReason}
_HRESULTS = {int(h): h.name for h in HResult}


# One answered request, as the status page lists it: a plain tuple of these fields (a
# dataclass instance would cost more than everything else counted per request).
RECENT_FIELDS = (
    "time",  # Unix time
    "address",
    "workstation",
    "application",
    "product",
    "protocol",
    "count",
    "required",
    "result",
)
Recent = tuple[float, str, str, str, str, str, int, int, str]


class Metrics:
    """Counters one KmsServer updates; read by the admin endpoint."""

    def __init__(self, database: ProductDatabase | None = None) -> None:
        db = database or products()
        self._applications = frozenset(a.name for a in db.applications.values())
        self._products = frozenset(s.name for s in db.skus.values())
        self.started = time.time()
        # (application, product, protocol, result) -> activations
        self.activations: dict[tuple[str, str, str, str], int] = {}
        # (kind, code) -> errors; kinds: fault, bind_nak, close, kms_error, internal
        self.errors: dict[tuple[str, str], int] = {}
        self.accepted = 0
        self.evicted = 0  # connections closed to make room for a new one
        self.refused: dict[Refusal, int] = {}  # connections refused, by reason
        self.latency = [0] * (len(BUCKETS) + 1)  # per bucket, not cumulative; last: +Inf
        self.latency_sum = 0.0
        self.latency_count = 0
        self.recent: deque[Recent] = deque(maxlen=RECENT)
        # Hooks the daemon sets: its store's commit failures, its DNS publication state.
        self.commit_failures: Callable[[], int] = lambda: 0
        self.dns_state: Callable[[], Mapping[str, Any] | None] = lambda: None

    # The per-request path ------------------------------------------------------------

    def activation(
        self,
        application: str,
        product: str,
        protocol: str,
        count: int,
        required: int,
        workstation: str,
        address: str,
        now: float,
    ) -> None:
        if application not in self._applications:
            application = UNKNOWN
        if product not in self._products:
            product = UNKNOWN
        result = "activated" if count >= required else "below_threshold"
        key = (application, product, protocol, result)
        activations = self.activations
        activations[key] = activations.get(key, 0) + 1
        self.recent.append(
            (now, address, workstation, application, product, protocol, count, required, result)
        )

    def refusal(
        self,
        hresult: int,
        version: tuple[int, int] | None,
        address: str,
        now: float,
        *,
        application: str = UNKNOWN,
        product: str = UNKNOWN,
        workstation: str = "",
    ) -> None:
        """A request answered with an HRESULT; `version`: the one it claims
        (kmsd.protocol.connection.Call); what it named when it decoded (names outside the
        product list are counted as unknown, as for activations)."""
        if application not in self._applications:
            application = UNKNOWN
        if product not in self._products:
            product = UNKNOWN
        code = f"0x{hresult:08X}"
        protocol = _protocol(version)
        result = f"refused-{code}"
        key = (application, product, protocol, result)
        self.activations[key] = self.activations.get(key, 0) + 1
        self.error("kms_error", _HRESULTS.get(hresult, code))
        self.recent.append(
            (now, address, workstation, application, product, protocol, 0, 0, result)
        )

    def bad_input(self, refusal: Fault | BindNak | None) -> None:
        """The fault or bind_nak the connection answered bad input with (Send.refusal)."""
        if isinstance(refusal, Fault):
            self.error("fault", _FAULTS.get(refusal.status, f"0x{refusal.status:08X}"))
        elif isinstance(refusal, BindNak):
            self.error("bind_nak", _NAKS.get(refusal.reason, str(refusal.reason)))
        else:
            self.error("other", "")

    def error(self, kind: str, code: str = "") -> None:
        key = (kind, code)
        self.errors[key] = self.errors.get(key, 0) + 1

    def refused_connection(self, refusal: Refusal) -> None:
        self.refused[refusal] = self.refused.get(refusal, 0) + 1

    def replied(self, seconds: float) -> None:
        """A reply was written `seconds` after its request was complete."""
        self.latency[bisect_left(BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    # Reading --------------------------------------------------------------------------

    def recent_activations(self) -> list[dict[str, Any]]:
        """Newest first."""
        return [dict(zip(RECENT_FIELDS, r, strict=True)) for r in reversed(self.recent)]

    def render(
        self,
        *,
        open_connections: int,
        tables: Iterable[tuple[str, int, int]] = (),
        ready: bool = True,
        loop_lag: float = 0.0,
        reported: Callable[[int], int] = int,
        override: tuple[int, int | None] = (0, None),
    ) -> str:
        """The Prometheus text exposition (version 0.0.4) of everything counted."""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        def sample(name: str, labels: Mapping[str, str], value: float) -> None:
            if labels:
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                out.append(f"{name}{{{text}}} {_number(value)}")
            else:
                out.append(f"{name} {_number(value)}")

        family(
            "kmsd_activations_total",
            "counter",
            "Activation requests answered, by application, product, protocol and result "
            "(activated, below_threshold, refused-HRESULT).",
        )
        for (app, product, protocol, result), n in sorted(self.activations.items()):
            labels = {"application": app, "product": product, "protocol": protocol}
            sample("kmsd_activations_total", {**labels, "result": result}, n)
        family("kmsd_clients", "gauge", "Clients counted now, per application.")
        table_rows = sorted(tables)
        for app, count, _ in table_rows:
            sample("kmsd_clients", {"application": app}, count)
        family("kmsd_client_table_capacity", "gauge", "Client table capacity, per application.")
        for app, _, capacity in table_rows:
            sample("kmsd_client_table_capacity", {"application": app}, capacity)
        family(
            "kmsd_reported_count",
            "gauge",
            "The count clients are told now, per application (kmsd_clients with the lab "
            "overrides applied).",
        )
        for app, count, _ in table_rows:
            sample("kmsd_reported_count", {"application": app}, reported(count))
        precharge, fixed_count = override
        family(
            "kmsd_lab_override",
            "gauge",
            "Lab overrides of the count in force: precharge (added) and fixed_count "
            "(reported to everyone; absent when off).",
        )
        sample("kmsd_lab_override", {"override": "precharge"}, precharge)
        if fixed_count is not None:
            sample("kmsd_lab_override", {"override": "fixed_count"}, fixed_count)
        family(
            "kmsd_errors_total",
            "counter",
            "Bad input and failures, by kind (fault, bind_nak, close, kms_error, internal, "
            "commit) and code.",
        )
        for (kind, code), n in sorted(self.errors.items()):
            sample("kmsd_errors_total", {"kind": kind, "code": code}, n)
        sample("kmsd_errors_total", {"kind": "commit", "code": ""}, self.commit_failures())
        family("kmsd_connections_open", "gauge", "KMS connections open now.")
        sample("kmsd_connections_open", {}, open_connections)
        family("kmsd_connections_accepted_total", "counter", "KMS connections accepted.")
        sample("kmsd_connections_accepted_total", {}, self.accepted)
        family(
            "kmsd_connections_evicted_total",
            "counter",
            "KMS connections closed to make room for a new one (all slots were taken).",
        )
        sample("kmsd_connections_evicted_total", {}, self.evicted)
        family("kmsd_connections_refused_total", "counter", "KMS connections refused, by reason.")
        for reason, n in sorted(self.refused.items()):
            sample("kmsd_connections_refused_total", {"reason": reason}, n)
        family(
            "kmsd_reply_seconds",
            "histogram",
            "Time from a complete request to its reply written, including the wait for "
            "its record's commit.",
        )
        cumulative = 0
        for bound, n in zip(BUCKETS, self.latency, strict=False):
            cumulative += n
            sample("kmsd_reply_seconds_bucket", {"le": _number(bound)}, cumulative)
        sample("kmsd_reply_seconds_bucket", {"le": "+Inf"}, self.latency_count)
        sample("kmsd_reply_seconds_sum", {}, self.latency_sum)
        sample("kmsd_reply_seconds_count", {}, self.latency_count)
        dns = self.dns_state()
        family(
            "kmsd_dns_published",
            "gauge",
            "1 while this host's SRV record is published (0: not yet, or failing); absent "
            "when DNS publication is off.",
        )
        for target in () if dns is None else dns.get("targets", [dns]):
            sample("kmsd_dns_published", {"zone": str(target.get("zone", ""))}, target["published"])
        family("kmsd_ready", "gauge", "1 when listening, the store's writer runs and commits.")
        sample("kmsd_ready", {}, ready)
        family("kmsd_event_loop_lag_seconds", "gauge", "Last measured event loop delay.")
        sample("kmsd_event_loop_lag_seconds", {}, loop_lag)
        family("kmsd_start_time_seconds", "gauge", "Unix time the daemon started.")
        sample("kmsd_start_time_seconds", {}, self.started)
        return "\n".join(out) + "\n"


def _protocol(version: tuple[int, int] | None) -> str:
    """The protocol label of a claimed version: the versions that exist, "other", or
    "unknown" when the request was too short to claim one."""
    if version is None:
        return UNKNOWN
    major, minor = version
    return f"{major}.{minor}" if major in SUPPORTED_MAJORS and minor < 10 else "other"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))
