#!/usr/bin/env python3
"""A benchmark sink that counts deliveries by their ``X-Gateway-Delivery-Id``.

The shared ``sink.py`` counts requests: a delivery sent twice (at-least-once allows it: a record
that failed, a lease that ran out while the target was answering) counts twice there, and a
count of requests equal to the count of notifications can hide one lost delivery behind one
duplicate. This one answers ``200 ok`` to every request as cheaply, and keeps the ids it saw:
``GET /__stats`` returns ``requests`` (every request), ``distinct`` (ids seen at least once),
``duplicates`` (requests whose id was seen before) and ``no_id`` (requests without one), and the
pauses between the first arrivals of two ids: ``longest_pause_ms`` and ``pauses_ms`` (each
over ``PAUSE_MS``, in arrival order), where a drain's target waited for the gateway.
``GET /__ids`` returns the distinct ids themselves, for a bench to compare with the outbox.

Loopback only. Usage: idsink.py --port 9000 [--expect-sha256 HEX] (accepted and ignored: the
same command line as ``sink.py``)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

OK = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
    b"Connection: keep-alive\r\n\r\nok"
)
HEADER = b"\nx-gateway-delivery-id:"
MAX_BUFFER = 4 * 1024 * 1024

SEEN: set[str] = set()
STATS = {"requests": 0, "distinct": 0, "duplicates": 0, "no_id": 0}
# When each distinct id first arrived (time.monotonic), for the pauses.
ARRIVED: list[float] = []
# A pause worth listing: several times what a batch of the drain takes on the wire.
PAUSE_MS = 15.0


def _stats() -> dict[str, object]:
    gaps = [(b - a) * 1000 for a, b in zip(ARRIVED, ARRIVED[1:], strict=False)]
    return STATS | {
        "longest_pause_ms": round(max(gaps, default=0.0), 1),
        "pauses_ms": [round(gap, 1) for gap in gaps if gap > PAUSE_MS],
    }


def _json(obj: object) -> bytes:
    body = json.dumps(obj).encode()
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: keep-alive\r\n\r\n" % len(body)
    )
    return head + body


def _count(head: bytes) -> None:
    STATS["requests"] += 1
    lower = head.lower()
    at = lower.find(HEADER)
    if at < 0:
        STATS["no_id"] += 1
        return
    end = head.find(b"\r", at + len(HEADER))
    delivery_id = head[at + len(HEADER) : end if end >= 0 else len(head)].strip().decode()
    if delivery_id in SEEN:
        STATS["duplicates"] += 1
    else:
        SEEN.add(delivery_id)
        STATS["distinct"] += 1
        ARRIVED.append(time.monotonic())


class Sink(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.t = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos, out = 0, []
        while True:
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:
                break
            head = buf[pos:end]
            at = head.lower().find(b"\ncontent-length:")
            length = 0
            if at >= 0:
                stop = head.find(b"\r", at + 16)
                length = int(head[at + 16 : stop if stop >= 0 else len(head)])
            if len(buf) < end + 4 + length:
                break
            pos = end + 4 + length
            if head.startswith(b"GET /__stats"):
                out.append(_json(_stats()))
            elif head.startswith(b"GET /__ids"):
                out.append(_json(sorted(SEEN)))
            else:
                _count(head)
                out.append(OK)
        if out:
            self.t.write(b"".join(out))
        self.buf = buf[pos:]
        if len(self.buf) > MAX_BUFFER:
            self.t.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--expect-sha256", default=None)
    args = parser.parse_args()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Sink, args.host, args.port, backlog=4096)
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
