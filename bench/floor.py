"""The floor under any KMS host written in Python on this event loop, for the activations
benchmark: what the loop, the kernel and the RPC bind cost when the KMS work and the store
cost nothing.

It binds with kmsd's own RPC code (remembered bind answers included) and answers each
distinct request once with kmsd's host (counting in memory); when the same request PDU
comes again (the benchmark sends a fixed pool of requests over and over) it sends the same
reply again with the call id patched. The replies stay genuine for the request they
answer, so the benchmark verifies them; the counts in them are stale. It is a measuring
device, not a KMS host.

    python bench/activations.py --server-cmd "python bench/floor.py {port}" \\
        --compare "/tmp/vlmcsd/bin/vlmcsd -D -e -L 127.0.0.1:{port}"
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kmsd.cache import MemoryCounter
from kmsd.eventloop import CHOICES, run_on_loop
from kmsd.host import HostIdentity, KmsHost
from kmsd.protocol.connection import (
    AssociationGroups,
    BindAnswers,
    Call,
    Close,
    ServerConnection,
)
from kmsd.protocol.errors import KmsError
from kmsd.protocol.products import products

REQUEST = 0  # PDU type
WHOLE = 0x03  # first and last fragment
MAX_REPLAYS = 100_000  # distinct requests remembered


class Shared:
    """What kmsd's connections share: association groups, remembered bind answers."""

    def __init__(self) -> None:
        self.groups = AssociationGroups(os.getpid())
        self.answers = BindAnswers()


class Replayer(asyncio.Protocol):
    def __init__(self, host: KmsHost, server: Shared, replies: dict[bytes, bytes]):
        self.host, self.replies = host, replies
        self.conn = ServerConnection(port=1688, groups=server.groups, answers=server.answers)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        # One whole single-fragment request PDU seen before: the same reply, this call id.
        whole = (
            len(data) > 24
            and data[2] == REQUEST
            and data[3] == WHOLE
            and int.from_bytes(data[8:10], "little") == len(data)
        )
        key = data[2:4] + data[16:] if whole else b""
        if (reply := self.replies.get(key)) is not None:
            self.transport.write(reply[:12] + data[12:16] + reply[16:])
            return
        for event in self.conn.feed(data):
            if isinstance(event, Call):
                try:
                    payload, _ = self.host.answer(event.payload, time.time(), "floor")
                except KmsError as exc:
                    self.transport.write(event.reply_error(exc.hresult))
                    continue
                reply = event.reply(payload)
                if key and len(self.replies) < MAX_REPLAYS:
                    self.replies[key] = reply
                self.transport.write(reply)
            elif isinstance(event, Close):
                self.transport.close()
            else:
                self.transport.write(event.data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.close()


async def serve(port: int) -> None:
    database = products()
    identity = HostIdentity(hwid=os.urandom(8))
    identity.complete(database, os.urandom, time.time())
    host = KmsHost(MemoryCounter(frozenset(database.applications)), identity)
    shared = Shared()
    replies: dict[bytes, bytes] = {}
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Replayer(host, shared, replies), "127.0.0.1", port, backlog=1024
    )
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"floor server on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("port", type=int, help="TCP port on 127.0.0.1")
    p.add_argument("--loop", choices=CHOICES, default="auto")
    args = p.parse_args(argv)
    run_on_loop(serve(args.port), args.loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
