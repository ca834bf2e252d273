"""The callback's decisions in order: who is calling, the handshake (GET), a notification (POST).

Rule: nothing here knows HTTP. :mod:`gateway.listener` parses requests and writes answers; this
module calls the pure checks (identity, handshake, signature, routing) in order and stores what
passes. A notification is answered 200 only once it is durably in the outbox.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from gateway.config import Config
from gateway.dispatcher import Dispatcher
from gateway.handshake import answer_challenge
from gateway.identity import check_client_identity
from gateway.outbox import Outbox
from gateway.routing import route
from gateway.signature import verify_signature
from gateway.stats import Stats

__all__ = ["ACCEPTED", "DUPLICATE", "Callback"]

ACCEPTED = "ok"
# Load generators recognise a stored-before duplicate by this first line (gateway.loadgen).
DUPLICATE = "ok (duplicate)"


class Callback:
    """What the callback URL does, given already-parsed requests."""

    def __init__(
        self,
        config: Config,
        outbox: Outbox,
        stats: Stats,
        dispatcher: Dispatcher | None = None,
        *,
        stored_elsewhere: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``dispatcher``: this process forwards. ``stored_elsewhere``: another process does,
        and this tells it there is something new (see :mod:`gateway.wake`)."""
        self.config = config
        self.outbox = outbox
        self.stats = stats
        self.dispatcher = dispatcher
        self._stored_elsewhere = stored_elsewhere
        self._clock = clock
        self._secrets = config.meta.app_secrets
        self._targets = config.targets

    def identify(self, peercert: Mapping[str, Any] | None) -> str | None:
        """The accepted client CN of a new connection; raises IdentityRejected (403).

        Checked once per connection: the certificate cannot change within a TLS connection
        (the server context refuses renegotiation)."""
        tls = self.config.tls
        try:
            cn = check_client_identity(peercert, tls.client_cn, tls.client_auth)
        except Exception:
            self.stats.rejected("identity")
            raise
        self.stats.saw_client(cn)
        return cn

    def handshake(self, params: Mapping[str, str]) -> str:
        """The challenge to echo (Meta's GET verification), or raises."""
        return answer_challenge(params, self.config.meta.verify_tokens)

    async def notify(self, body: bytes, signature: str | None) -> str:
        """Verify, parse, route and store one notification; the reason to answer 200 with.

        Raises :class:`~gateway.errors.Rejected` for a bad signature (401) or body (400), and
        lets :class:`~gateway.errors.OutboxError` escape (503: Meta retries)."""
        try:
            verify_signature(self._secrets, body, signature)
        except Exception:
            self.stats.rejected("signature")
            raise
        routes = route(body, self._targets)
        assert signature is not None  # verify_signature refuses a missing header
        stored = await self.outbox.accept(body, signature, routes, self._clock())
        if stored is None:
            self.stats.duplicate()
            return DUPLICATE
        self.stats.accepted()
        if self.dispatcher is not None:
            # Sent at the end of this turn of the event loop, in one batch with the others stored
            # in the same group commit; the answer does not wait for it.
            self.dispatcher.offer(stored)
        elif self._stored_elsewhere is not None:
            self._stored_elsewhere()
        return ACCEPTED
