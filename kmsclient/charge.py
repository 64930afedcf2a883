"""`kmsclient charge`: distinct clients until the host's count reaches the threshold."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from kmsd.protocol.client import prepare
from kmsd.protocol.kms import BaseRequest

from .activation import DEFAULT_OPTIONS, Activator, CallOptions, Result
from .outcome import Status
from .target import Target

MakeRequest = Callable[[uuid.UUID], BaseRequest]


@dataclass
class ChargeReport:
    threshold: int
    counts: list[int] = field(default_factory=list)  # one per verified reply
    status: Status = Status.BELOW_THRESHOLD
    stopped: str = ""  # why the run stopped
    last: Result | None = None

    @property
    def reached(self) -> bool:
        return bool(self.counts) and self.counts[-1] >= self.threshold


async def charge(
    target: Target,
    make_request: MakeRequest,
    threshold: int,
    *,
    options: CallOptions = DEFAULT_OPTIONS,
    max_clients: int = 50,
    stall: int = 3,
    new_connection: bool = False,
) -> ChargeReport:
    """Send requests with new client machine IDs until the count reaches `threshold`,
    `stall` new clients in a row leave it unchanged, or `max_clients` have been sent.
    The first failed exchange ends the run with its status."""
    report = ChargeReport(threshold)
    activator = Activator(target, options)
    unchanged = 0
    try:
        for _ in range(max_clients):
            result = await activator.run(prepare(make_request(uuid.uuid4())))
            report.last = result
            if result.verified is None:
                report.status = result.status
                report.stopped = "exchange failed"
                return report
            count = result.verified.reply.base.count
            unchanged = unchanged + 1 if report.counts and count <= report.counts[-1] else 0
            report.counts.append(count)
            if count >= threshold:
                report.status, report.stopped = Status.ACTIVATED, "threshold reached"
                return report
            if unchanged >= stall:
                report.stopped = f"the count did not grow for {stall} new clients"
                return report
            if new_connection:
                await activator.close()
        report.stopped = f"{max_clients} clients sent"
        return report
    finally:
        await activator.close()
