"""The callback's decisions in order: who is calling, the handshake (GET), a notification (POST).

Rule: nothing here knows HTTP, and nothing here knows delivery. The front door (the listener,
or an aiohttp app) parses requests and writes answers; this module calls the pure checks
(identity, handshake, signature, routing) in order and stores what passes; what happens to a
stored notification next is the ``on_stored`` hook's business. A notification is answered 200
only once it is durably in the outbox.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from gateway.config import Config
from gateway.edge.handshake import answer_challenge
from gateway.edge.identity import Verdicts, check_client_identity
from gateway.edge.routing import Plan, route
from gateway.outbox import AcceptsSoon, Delivery, Outbox, Route, Settles, settle_from
from gateway.signing import AppKeys, verify_signature

if TYPE_CHECKING:
    # Annotations only: with tracing off no OpenTelemetry module is imported at all.
    from gateway.tracing import Notified, Span, Tracing

__all__ = ["ACCEPTED", "DUPLICATE", "Callback", "Counters", "StoredHook"]

# Told of the deliveries of each notification just committed, before its 200 goes out; it must
# not block (the runtime hands them to the dispatcher, or rings a sibling worker's doorbell).
StoredHook = Callable[[Sequence[Delivery]], None]

ACCEPTED = "ok"
# Load generators recognise a stored-before duplicate by this first line
# (gateway.onboarding.loadgen).
DUPLICATE = "ok (duplicate)"


class Counters(Protocol):
    """What the callback and its front doors count (the runtime's metrics provide it)."""

    def accepted(self) -> None: ...
    def duplicate(self) -> None: ...
    def rejected(self, reason: str) -> None: ...
    def saw_client(self, cn: str | None, address: str | None = None) -> None: ...
    def tls_handshake_failed(self, reason: str) -> None: ...
    def proxy_header_refused(self, reason: str) -> None: ...
    def answered(self, status: int, seconds: float) -> None: ...


class Callback:
    """What the callback URL does, given already-parsed requests."""

    def __init__(
        self,
        config: Config,
        outbox: Outbox,
        stats: Counters,
        *,
        on_stored: StoredHook | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``on_stored``: told of each new notification's deliveries once they are committed
        (see :data:`StoredHook`); ``None`` when nothing in this process forwards."""
        self.config = config
        self.outbox = outbox
        self.stats = stats
        self._on_stored = on_stored
        self._clock = clock
        self._keys = AppKeys(config.meta.app_secrets)  # keyed once per configuration
        self._routing = Plan.of(config.targets)
        self._verdicts = Verdicts(config.tls.client_cn, config.tls.client_auth)
        # Set by the runtime when [tracing] is enabled; None: no span is ever made.
        self.tracing: Tracing | None = None
        # The outbox, when it offers accept as a future (looked up once, not per request).
        self._soon = outbox if isinstance(outbox, AcceptsSoon) else None

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded configuration: client CNs, verify tokens, app secrets and targets
        apply from the next connection or request on; requests in flight finish as they began."""
        self.config = config
        self._keys = AppKeys(config.meta.app_secrets)  # keyed once per configuration
        self._routing = Plan.of(config.targets)
        self._verdicts = Verdicts(config.tls.client_cn, config.tls.client_auth)

    def answered(self, status: int, seconds: float) -> None:
        """A request was answered with ``status`` after ``seconds`` (for the metrics)."""
        self.stats.answered(status, seconds)

    def identify(
        self, peercert: Mapping[str, Any] | None, address: str | None = None
    ) -> str | None:
        """The accepted client CN of a new connection from ``address``; raises
        IdentityRejected (403).

        Checked once per connection: the certificate cannot change within a TLS connection
        (the server context refuses renegotiation)."""
        tls = self.config.tls
        try:
            cn = check_client_identity(peercert, tls.client_cn, tls.client_auth)
        except Exception:
            self.stats.rejected("identity")
            raise
        self.stats.saw_client(cn, address)
        return cn

    def identify_certificate(
        self,
        der: bytes | None,
        peercert: Callable[[], Mapping[str, Any] | None],
        address: str | None = None,
    ) -> tuple[str | None, str | None]:
        """:meth:`identify` of the certificate ``der`` (``getpeercert(binary_form=True)``),
        whose ``getpeercert()`` dict is read only for a certificate not seen before: the
        accepted CN and the certificate's ``notAfter``; raises IdentityRejected (403)."""
        verdict = self._verdicts.of(der, peercert)
        try:
            cn = verdict.accepted()
        except Exception:
            self.stats.rejected("identity")
            raise
        self.stats.saw_client(cn, address)
        return cn, verdict.not_after

    def handshake(self, params: Mapping[str, str]) -> str:
        """The challenge to echo (Meta's GET verification), or raises."""
        return answer_challenge(params, self.config.meta.verify_tokens)

    async def notify(self, body: bytes, signature: str | None, span: Span | None = None) -> str:
        """Verify, parse, route and store one notification; the reason to answer 200 with.
        ``span``: the request's SERVER span when it is traced (the commit becomes its child,
        and its trace context is stored with the deliveries).

        Raises :class:`~gateway.errors.Rejected` for a bad signature (401) or body (400), and
        lets :class:`~gateway.errors.OutboxError` escape (503: Meta retries)."""
        routes = self._checked(body, signature)
        assert signature is not None  # verify_signature refuses a missing header
        if span is None or self.tracing is None:
            stored = await self.outbox.accept(body, signature, routes, self._clock())
        else:
            stored = await self._traced_accept(self.tracing, span, body, signature, routes)
        return self._stored(stored)

    def notify_soon(
        self, body: bytes, signature: str | None, traced: Notified | None = None
    ) -> asyncio.Future[str]:
        """:meth:`notify` as a future: what :meth:`notify` raises before the outbox is reached
        (a bad signature or body) is raised here at once, and the future resolves with the
        reason once the notification is durable, or fails as :meth:`notify` would. With an
        outbox that offers ``accept_soon`` (:class:`~gateway.outbox.AcceptsSoon`) no task is
        made for the request. ``traced``: the request's record when it is traced (the commit is
        timed in it, and its trace context is stored with the deliveries); the caller ends it
        with the status it answers, and with the future's error, the commit's."""
        routes = self._checked(body, signature)
        assert signature is not None  # verify_signature refuses a missing header
        tracing = self.tracing
        if traced is None or tracing is None:
            if self._soon is None:
                return asyncio.ensure_future(self._accept(body, signature, routes))
            # The reason is made by _stored on the event loop's thread right after the commit.
            return self._soon.accept_soon(body, signature, routes, self._clock(), then=self._stored)
        traced.committing()
        context = tracing.stored_notified(traced)

        def then(stored: list[Delivery] | None) -> str:
            traced.committed(stored)
            return self._stored(stored)

        if self._soon is None:
            return asyncio.ensure_future(self._accept(body, signature, routes, context, then))
        return self._soon.accept_soon(body, signature, routes, self._clock(), context, then=then)

    def notify_into(self, body: bytes, signature: str | None, into: Settles[str]) -> None:
        """:meth:`notify_soon` of an untraced request, settling ``into`` with the reason or the
        error instead of returning a future. With an outbox that offers ``accept_into`` it is
        settled on the event loop's thread as soon as the notification is durable, not at the
        loop's next turn, where a future's done callbacks run (one turn per group commit)."""
        routes = self._checked(body, signature)
        assert signature is not None  # verify_signature refuses a missing header
        if self._soon is None:
            task = asyncio.ensure_future(self._accept(body, signature, routes))
            task.add_done_callback(lambda done: settle_from(into, done))
            return
        self._soon.accept_into(body, signature, routes, self._clock(), then=self._stored, into=into)

    def _checked(self, body: bytes, signature: str | None) -> Sequence[Route]:
        """The routes of a notification whose signature holds; raises Rejected."""
        try:
            verify_signature(self._keys, body, signature)
        except Exception:
            self.stats.rejected("signature")
            raise
        return route(body, self._routing)

    async def _accept(
        self,
        body: bytes,
        signature: str,
        routes: Sequence[Route],
        trace: str | None = None,
        then: Callable[[list[Delivery] | None], str] | None = None,
    ) -> str:
        stored = await self.outbox.accept(body, signature, routes, self._clock(), trace)
        return (then or self._stored)(stored)

    def _stored(self, stored: list[Delivery] | None) -> str:
        """Count a notification the outbox has committed, hand its deliveries on, and say what
        to answer."""
        if stored is None:
            self.stats.duplicate()
            return DUPLICATE
        self.stats.accepted()
        if self._on_stored is not None:
            # The dispatcher sends them at the end of this turn of the event loop, in one batch
            # with the others stored in the same group commit; the answer does not wait for it.
            self._on_stored(stored)
        return ACCEPTED

    async def _traced_accept(
        self, tracing: Tracing, span: Span, body: bytes, signature: str, routes: Sequence[Route]
    ) -> list[Delivery] | None:
        """The outbox commit inside its span, storing the trace context of ``span``."""
        commit = tracing.commit_span(span)
        try:
            stored = await self.outbox.accept(
                body, signature, routes, self._clock(), trace=tracing.stored(span)
            )
            tracing.committed(commit, None if stored is None else len(stored))
        except BaseException as exc:
            tracing.failed(commit, exc)
            raise
        finally:
            commit.end()
        return stored
