"""A webhook consumer written the way WhatsApp libraries (pywa, heyoo) write theirs.

Rule: it does only what such a library does with a POST, so a test learns what an unmodified
consumer behind the gateway sees. It checks ``X-Hub-Signature-256`` over the raw body with the
app secret it was configured with (hmac.compare_digest, 401 on a mismatch, as pywa answers),
then parses the body with ``json`` and reads only ``entry[0]["changes"][0]``: any other entry or
change of the body is never looked at. It is a :class:`~sink.Sink`, so a real HTTP server on
127.0.0.1 that records every request as well.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from sink import Received, Sink

__all__ = ["Consumer"]


class Consumer(Sink):
    """``async with Consumer(app_secret) as consumer``: ``consumer.changes`` holds the change
    read from each verified request, ``consumer.refused`` each request that failed the check."""

    def __init__(self, app_secret: str) -> None:
        super().__init__()
        self.app_secret = app_secret
        self.changes: list[Any] = []
        self.refused: list[Received] = []

    def verified(self, body: bytes, header: str | None) -> bool:
        """Meta's check: HMAC-SHA256 of the raw bytes under the app secret, in constant time
        (whatsapp/webhooks/overview, "Validating payloads")."""
        if header is None or not header.startswith("sha256="):
            return False
        expected = hmac.new(self.app_secret.encode(), body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(header.removeprefix("sha256="), expected)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = CIMultiDictProxy(CIMultiDict(request.headers))
        received = Received(request.path, headers, body, time.monotonic())
        self.received.append(received)
        if not self.verified(body, headers.get("X-Hub-Signature-256")):
            self.refused.append(received)
            return web.Response(status=401, text="invalid signature")
        update = json.loads(body)
        # What the libraries hand their handlers: the first change of the first entry, only.
        self.changes.append(update["entry"][0]["changes"][0])
        return web.Response(text="ok")
