"""``kind = "nats"``: each delivery is one message published to NATS JetStream.

The message data is the exact bytes an HTTP target would receive, its headers the headers an
HTTP target would get, under the same names (:mod:`gateway.delivery.headers`: all but
``Content-Type`` and ``User-Agent``), and ``Nats-Msg-Id`` is the delivery id: a retry after a
lost acknowledgement (a timeout, a crash before the outbox recorded it) is dropped by the stream
as a duplicate within its duplicate window (two minutes by default). A delivery is done only on
JetStream's publish acknowledgement.

No stream capturing the subject, and a message larger than the server's ``max_payload`` or the
stream's ``max_msg_size``, are permanent: retrying cannot change them, so they are dead letters
with that reason. Anything else (server down, no acknowledgement in time) is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck

from gateway.config import TargetConfig
from gateway.delivery.headers import delivery_headers
from gateway.errors import TargetError, TargetUnreachable
from gateway.outbox import Delivery
from gateway.outbox.model import AttemptResult

__all__ = ["JetStreamSender"]

log = logging.getLogger(__name__)

# JetStream's error code for a message over the stream's max_msg_size (server errors.json).
_MESSAGE_TOO_LARGE = 10054
_NOT_SENT = AttemptResult(error="nats: not sent")  # a placeholder, always replaced


class JetStreamSender:
    """Publishes deliveries to one subject over one NATS connection (requests multiplexed)."""

    def __init__(self, target: TargetConfig) -> None:
        assert target.subject is not None  # load_config requires it with kind = "nats"
        self.target = target
        self._subject = target.subject
        self._servers = [server.strip() for server in target.url.split(",")]
        self._client: Client | None = None
        self._js: JetStreamContext | None = None
        self._js_client: Client | None = None
        self._connecting = asyncio.Lock()

    async def _connected(self) -> Client:
        """The connection, made now if there is none (or the last one was lost for good)."""
        async with self._connecting:
            if self._client is not None and not self._client.is_closed:
                return self._client
            client = Client()
            try:
                async with asyncio.timeout(self.target.timeout_s):
                    await client.connect(
                        servers=self._servers,
                        connect_timeout=max(1, int(self.target.timeout_s)),
                        # Each server tried twice, then the connection is given up: the
                        # dispatcher's retries and backoff decide when to connect again, so a
                        # broker that is down costs an attempt, not a wait of timeout_s.
                        reconnect_time_wait=0,
                        max_reconnect_attempts=1,
                        allow_reconnect=True,
                        error_cb=self._on_error,
                        disconnected_cb=self._on_disconnected,
                        reconnected_cb=self._on_reconnected,
                    )
            except BaseException:
                await client.close()
                raise
            self._client = client
            return client

    async def _on_error(self, exc: Exception) -> None:
        log.debug("target %s: nats: %s", self.target.name, exc)

    async def _on_disconnected(self) -> None:
        log.info("target %s: disconnected from NATS; reconnecting", self.target.name)

    async def _on_reconnected(self) -> None:
        log.info("target %s: reconnected to NATS", self.target.name)

    async def send_many(
        self,
        deliveries: Sequence[Delivery],
        attempts: Sequence[int],
        trace_headers: Sequence[Mapping[str, str]] | None = None,
    ) -> list[AttemptResult]:
        try:
            client = await self._connected()
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            failed = AttemptResult(error=f"nats: cannot connect: {_reason(exc)}")
            return [failed] * len(deliveries)
        now = time.time()
        js = self._publisher(client)
        results: list[AttemptResult] = []
        # Each publish goes out at once and its acknowledgement comes back on one shared reply
        # subscription (publish_async): no task and no reply inbox per message, as publish()
        # would make; then all the batch's acknowledgements are awaited together.
        waiting: dict[int, asyncio.Future[PubAck]] = {}
        for index, (delivery, attempt) in enumerate(zip(deliveries, attempts, strict=True)):
            results.append(_NOT_SENT)
            headers = delivery_headers(delivery, self.target, attempt, now)
            if trace_headers is not None:
                headers.update(trace_headers[index])
            headers["Nats-Msg-Id"] = delivery.id
            # The server counts headers and data against max_payload, and closes the whole
            # connection on a message over it: refused here, with a reason, instead.
            size, most = len(delivery.body) + _header_bytes(headers), client.max_payload
            if size > most:
                results[index] = AttemptResult(
                    error=f"nats: message of {size} bytes is over the server's max_payload"
                    f' ({most} bytes): use split = "change" or raise max_payload',
                    permanent=True,
                )
                continue
            try:
                # No wait_stall: a timeout there costs a task per message. The context admits
                # 4,000 unacknowledged messages, above a target's concurrency of batches.
                waiting[index] = await js.publish_async(
                    self._subject, delivery.body, headers=headers
                )
            except (OSError, nats.errors.Error) as exc:
                results[index] = AttemptResult(error=f"nats: {_reason(exc)}"[:300])
        if waiting:
            _, late = await asyncio.wait(waiting.values(), timeout=self.target.timeout_s)
            for future in late:
                future.cancel()  # forgotten by the context, its pending slot given back
        for index, future in waiting.items():
            results[index] = self._result(future)
        return results

    def _result(self, future: asyncio.Future[PubAck]) -> AttemptResult:
        if future.cancelled():
            return AttemptResult(error=f"nats: no acknowledgement in {self.target.timeout_s:g}s")
        exc = future.exception()
        if isinstance(exc, nats.js.errors.NoStreamResponseError):
            return AttemptResult(error=self._no_stream(), permanent=True)
        if isinstance(exc, nats.js.errors.APIError):
            permanent = exc.err_code == _MESSAGE_TOO_LARGE
            return AttemptResult(error=f"nats: {exc.description}"[:300], permanent=permanent)
        if exc is not None:
            return AttemptResult(error=f"nats: {_reason(exc)}"[:300])
        ack = future.result()
        seen = " (a duplicate, already stored)" if ack.duplicate else ""
        return AttemptResult(
            accepted=True, response_excerpt=f"stream {ack.stream} seq {ack.seq}{seen}"
        )

    def _publisher(self, client: Client) -> JetStreamContext:
        """One JetStream context per connection, made once, not for every message."""
        if self._js is None or self._js_client is not client:
            self._js = client.jetstream(timeout=self.target.timeout_s)
            self._js_client = client
        return self._js

    def _no_stream(self) -> str:
        return f"nats: no JetStream stream captures subject {self._subject!r}"

    async def warm(self) -> None:
        # Down now: the deliveries wait and are retried.
        with contextlib.suppress(TimeoutError, OSError, nats.errors.Error):
            await self._connected()

    async def probe(self) -> str:
        where = f"target {self.target.name!r}: nats {_hosts(self._servers)}"
        try:
            client = await self._connected()
            async with asyncio.timeout(self.target.timeout_s):
                stream = await client.jetstream().find_stream_name_by_subject(self._subject)
        except nats.js.errors.NotFoundError as exc:
            raise TargetError(f"{where}: {self._no_stream()}") from exc
        except nats.errors.NoRespondersError as exc:
            raise TargetError(f"{where}: JetStream is not enabled on the server") from exc
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            raise TargetUnreachable(f"{where}: cannot connect: {_reason(exc)}") from exc
        return (
            f"{where} reachable, stream {stream!r} captures subject {self._subject!r}"
            f" (max_payload {client.max_payload} bytes)"
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def _header_bytes(headers: dict[str, str]) -> int:
    """The size of ``headers`` on the wire: "NATS/1.0\\r\\n", "name: value\\r\\n" each, "\\r\\n"."""
    return 12 + sum(len(name) + len(value) + 4 for name, value in headers.items())


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".rstrip(": ") if str(exc) else type(exc).__name__


def _hosts(servers: Sequence[str]) -> str:
    """Hosts and ports, never credentials."""
    return ",".join(
        f"{urlsplit(server).hostname}:{urlsplit(server).port or 4222}" for server in servers
    )
