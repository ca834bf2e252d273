"""Meta-like load on a gateway process: keep-alive clients posting unique, signed notifications
over mTLS without a pause, for the tests that do something to the gateway mid-stream (SIGKILL,
reload).

Rule: a body counts as acknowledged only when its answer was 200; every other answer and every
failed request is kept, so a test can demand that there were none.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from helpers import message_body, meta_signature
from pki import Pki
from sink import DEADLINE_S

__all__ = ["Load"]


class Load:
    """``clients`` keep-alive clients posting to ``port`` until :meth:`stop`."""

    def __init__(self, port: int, pki: Pki, label: str, *, clients: int = 8) -> None:
        self.url = f"https://localhost:{port}/webhook"
        self.pki = pki
        self.label = label
        self.clients = clients
        self.sent: set[bytes] = set()
        self.acked: set[bytes] = set()
        self.refused: list[str] = []  # other answers and failed requests, in words
        self.in_flight = 0
        self._stopped = asyncio.Event()
        self._running: asyncio.Future[list[None]] | None = None

    def start(self) -> None:
        self._running = asyncio.gather(*(self._client(number) for number in range(self.clients)))

    async def stop(self) -> None:
        """Let each client finish the request it has under way, then end."""
        self._stopped.set()
        assert self._running is not None
        await self._running

    async def _client(self, number: int) -> None:
        connector = aiohttp.TCPConnector(ssl=self.pki.client_context("meta"), limit=1)
        timeout = aiohttp.ClientTimeout(total=DEADLINE_S)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            sequence = 0
            while not self._stopped.is_set():
                sequence += 1
                body = message_body(f"{self.label} {number}.{sequence}")
                headers = {
                    "Content-Type": "application/json",
                    "X-Hub-Signature-256": meta_signature(body),
                }
                self.sent.add(body)
                self.in_flight += 1
                try:
                    async with session.post(self.url, data=body, headers=headers) as response:
                        await response.read()
                        if response.status == 200:
                            self.acked.add(body)
                        else:
                            self.refused.append(f"HTTP {response.status}")
                except (aiohttp.ClientError, OSError) as exc:
                    self.refused.append(repr(exc))
                    await asyncio.sleep(0.01)  # not listening yet, or gone: try again shortly
                finally:
                    self.in_flight -= 1

    async def until(self, acked: int, in_flight: int) -> None:
        """Return once at least ``acked`` bodies were acknowledged and ``in_flight`` requests
        are under way (sent, not yet answered)."""
        deadline = time.monotonic() + DEADLINE_S
        while len(self.acked) < acked or self.in_flight < in_flight:
            assert time.monotonic() < deadline, (
                f"{self.label}: {len(self.acked)} acknowledged, {self.in_flight} in flight"
            )
            await asyncio.sleep(0.005)
