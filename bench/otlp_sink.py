"""A loopback OTLP/HTTP collector for benchmarks that costs what a collector on another host
would cost the gateway's machine: next to nothing. It reads each POST's body and drops it (no
protobuf decoding: a real collector's CPU is not ours to pay), answers every export at once with
an empty ``ExportTraceServiceResponse`` and keeps the connection alive, as OTLP/HTTP exporters
expect. At exit it prints the exports and bytes it took (a test sink that decodes the spans is
``tests/support/otlp.py``).

Usage: python bench/otlp_sink.py [--port 4318]   (prints exports and bytes at exit, or on SIGINT)
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time

# An empty ExportTraceServiceResponse encodes as no bytes at all.
_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n"
_REFUSED = b"HTTP/1.1 411 Length Required\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_HEAD_LIMIT = 64 * 1024
_BUFFER = 256 * 1024


class Totals:
    """What the sink took, over its whole life."""

    def __init__(self) -> None:
        self.exports = 0
        self.bytes = 0
        self.connections = 0
        self.started = time.monotonic()


class Export(asyncio.BufferedProtocol):
    """One collector connection: request heads parsed for Content-Length, bodies skipped. Reads
    go into one buffer kept for the connection's life (no allocation per read)."""

    def __init__(self, totals: Totals) -> None:
        self._totals = totals
        self._buffer = memoryview(bytearray(_BUFFER))
        self._head = bytearray()
        self._body_left = 0  # bytes of the current body still to skip
        self._close = False
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._totals.connections += 1

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        view = self._buffer[:nbytes]
        while view:
            if self._body_left:
                taken = min(self._body_left, len(view))
                self._body_left -= taken
                self._totals.bytes += taken
                view = view[taken:]
                if not self._body_left:
                    self._answer()
                continue
            self._head += view
            view = view[len(view) :]
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > _HEAD_LIMIT:
                    self._refuse()
                return
            head, rest = bytes(self._head[:end]), bytes(self._head[end + 4 :])
            self._head.clear()
            length = None
            self._close = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    self._close = True
            if length is None:  # chunked bodies are not sent by OTLP/HTTP exporters
                self._refuse()
                return
            self._body_left = length
            if not length:
                self._answer()
            view = memoryview(rest)

    def _answer(self) -> None:
        assert self._transport is not None
        self._totals.exports += 1
        self._transport.write(_ANSWER)
        if self._close:
            self._transport.close()

    def _refuse(self) -> None:
        assert self._transport is not None
        self._transport.write(_REFUSED)
        self._transport.close()


async def serve(port: int, totals: Totals) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Export(totals), "127.0.0.1", port)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    totals = Totals()
    try:
        asyncio.run(serve(args.port, totals))
    finally:
        cpu = time.process_time()
        print(
            f"exports received: {totals.exports}, bytes: {totals.bytes:,}, connections: "
            f"{totals.connections}, CPU {cpu:.2f} s over {time.monotonic() - totals.started:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
