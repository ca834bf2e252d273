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

nats-py keeps what a driver is for: the servers, connecting and reconnecting, credentials, TLS,
the connection's read loop and the queue of what it has to write. The hot part is done here
instead, with the protocol as JetStream defines it: each message one ``HPUB`` to the subject
with a reply subject of its own under one inbox this sender subscribes to once per connection,
the batch's messages written at once, behind that queue, without waking nats-py's flusher
task (:func:`_publish`), and each acknowledgement matched to its delivery by its
reply subject as nats-py's parser reads it (:class:`_Client`). nats-py's ``publish_async``
encodes and validates the headers, makes a future, a token and a done callback, and takes a
semaphore, for every message, and its subscriptions hand each message on as an object, through
a queue, to a task: together more than twice the CPU per delivery of the whole HTTP target's
path.

TLS: nats-py upgrades a connection to TLS only when the server's INFO asks for it, whatever the
URL's scheme or a context given, and otherwise speaks in the clear. So a ``tls://`` server, and
every server of a target with its own ``ca_file`` or ``cert_file`` (the context built from them,
:mod:`gateway.delivery.target_tls`), is refused before anything is sent unless it requires TLS.
The certificate is checked against each server's own host name, nats-py's default: a single
``tls_hostname`` would be wrong for all the servers of a list but one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client

from gateway.config import TargetConfig, nats_servers, without_user_info
from gateway.delivery.answers import kept_words
from gateway.delivery.headers import delivery_headers
from gateway.errors import TargetError, TargetUnreachable
from gateway.outbox import Delivery
from gateway.outbox.model import AttemptResult

__all__ = ["JetStreamSender", "ack_result", "header_block"]

log = logging.getLogger(__name__)

# JetStream's error code for a message over the stream's max_msg_size (server errors.json).
_MESSAGE_TOO_LARGE = 10054
# The status of the server's answer when nothing subscribes to the subject: for a JetStream
# publish, no stream captures it (ADR-2, no responders).
_NO_RESPONDERS = "503"
_NOT_SENT = AttemptResult(error="nats: not sent")  # a placeholder, always replaced
_NO_NEWLINES = str.maketrans("\r\n", "  ")
# A header block of each set of names met so far (signature modes, traced or not): a format
# with the names in it, so a message's headers are one formatting of its values.
_BLOCKS: dict[tuple[str, ...], str] = {}


def header_block(headers: Mapping[str, str]) -> bytes:
    """``headers`` as a NATS message carries them: ``NATS/1.0``, then ``name: value`` lines,
    then an empty line (the NATS protocol's HPUB, as HTTP/1 writes headers)."""
    names = tuple(headers)
    form = _BLOCKS.get(names)
    if form is None:
        lines = "".join(f"{name.replace('%', '%%')}: %s\r\n" for name in names)
        form = _BLOCKS.setdefault(names, f"NATS/1.0\r\n{lines}\r\n")
    return (form % tuple(headers.values())).encode()


def ack_result(status: str | None, data: bytes, body: bytes = b"") -> AttemptResult | None:
    """JetStream's answer to one publish as the attempt's result; ``status``: the answer's
    header status, if it has one. None: no stream captures the subject. An acknowledgement is
    kept as the stream it went to (and whether it was a duplicate), not its sequence: as for an
    HTTP target's 2xx (:mod:`gateway.delivery.answers`), the outcome says what an operator
    needs, and the result is one shared value rather than one made per delivery.

    Anything else may come from a service subscribed to the subject rather than from
    JetStream, quoting the message it was sent (``body``): its words are kept as an HTTP
    target's answer is (:func:`~gateway.delivery.answers.kept_words`), never as they came."""
    if status == _NO_RESPONDERS:
        return None
    try:
        answer = orjson.loads(data)
    except orjson.JSONDecodeError:
        answer = None
    if type(answer) is not dict:
        return _not_an_ack(data, body)
    error = answer.get("error")
    if error is not None:
        if type(error) is not dict:
            return AttemptResult(error=f"nats: {kept_words(body, str(error))}"[:300])
        permanent = error.get("err_code") == _MESSAGE_TOO_LARGE
        said = kept_words(body, str(error.get("description")))
        return AttemptResult(error=f"nats: {said}"[:300], permanent=permanent)
    stream = answer.get("stream")
    if type(stream) is not str or type(answer.get("seq")) is not int:
        return _not_an_ack(data, body)
    return _stored(stream, answer.get("duplicate") is True)


def _not_an_ack(data: bytes, body: bytes) -> AttemptResult:
    # Read as text, so that an echo is found in the spelling the notification has.
    said = kept_words(body, data[:100].decode("utf-8", "replace"))
    return AttemptResult(error=f"nats: not a publish acknowledgement: {said!r}")


@functools.lru_cache(maxsize=64)
def _stored(stream: str, duplicate: bool) -> AttemptResult:
    seen = " (a duplicate, already stored)" if duplicate else ""
    return AttemptResult(accepted=True, response_excerpt=f"stream {stream}{seen}")


class _Client(Client):
    """nats-py's client, except that the messages of one subscription, the sender's inbox, go
    straight from its protocol parser to ``on_reply(subject, data, headers)``: not as a message
    object through the subscription's queue and task, nats-py's path for every message, which
    cost more CPU per acknowledgement than the rest of the sender. Everything else (the other
    subscriptions, connecting, reconnecting and subscribing again, errors) is nats-py's."""

    def __init__(self, on_reply: Callable[[bytes, bytes, bytes | None], None]) -> None:
        super().__init__()
        self.on_reply = on_reply
        self.reply_sid = 0  # the inbox subscription's id; nats-py numbers them from 1

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        if sid == self.reply_sid:
            self.on_reply(subject, data, headers)
            return
        await super()._process_msg(sid, subject, reply, data, headers)

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        # The server's first INFO on each connection (and each reconnection), read before
        # nats-py decides on TLS and before CONNECT carries the credentials: a server that
        # does not require TLS would be spoken to in the clear.
        server = self._current_server
        if (
            initial_connection
            and server is not None
            # Held to TLS: a tls:// server, or any server with the target's own context.
            and (server.uri.scheme == "tls" or "tls" in self.options)
            and not info.get("tls_required")
        ):
            raise _NotTls(
                f"{server.uri.hostname}:{server.uri.port} does not require TLS, so nats-py"
                " would not use it: a tls:// server, or one with the target's ca_file or"
                " cert_file, is never spoken to in the clear"
            )
        await super()._process_info(info, initial_connection)


class _NotTls(nats.errors.Error):
    """A server to be spoken to over TLS does not require it; ``str()`` says so whole."""


class _CannotConnect(nats.errors.Error):
    """No server was connected to, and ``failure`` is why: what nats-py told the error
    callback last. Its own error says only that no server is left, or (after a failed TLS
    handshake, where it waits for a connection to close that never does) none in time."""

    def __init__(self, failure: BaseException) -> None:
        super().__init__(failure)
        self.failure = failure


class _Batch:
    """The results of one exchange, filled in as the acknowledgements arrive."""

    __slots__ = ("deliveries", "done", "left", "results")

    def __init__(self, deliveries: Sequence[Delivery]) -> None:
        # Their bodies: a reply that is no acknowledgement is checked for quoting them.
        self.deliveries = deliveries
        self.results = [_NOT_SENT] * len(deliveries)
        self.left = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class JetStreamSender:
    """Publishes deliveries to one subject over one NATS connection, acknowledgements coming
    back on one subscription."""

    def __init__(self, target: TargetConfig, tls: ssl.SSLContext | None = None) -> None:
        """``tls``: the context of the target's own ``ca_file`` / ``cert_file``, used with
        every server, each held to TLS; None: nats-py's default context (the system's trust
        store) with a server that requires TLS."""
        assert target.subject is not None  # load_config requires it with kind = "nats"
        self.target = target
        self._tls = tls
        self._subject = target.subject
        # nats-py sends each server's own user info, so a server written without (the second
        # of "nats://USER:PASSWORD@a:4222,nats://b:4222") would get none: the credentials are
        # taken from the server that carries them and sent to whichever one is connected to
        # (load_config refuses servers carrying different ones), and to those the cluster
        # announces.
        servers = [without_user_info(server) for server in nats_servers(target.url)]
        self._servers = [server for server, _ in servers]
        info = next((info for _, info in servers if info), None)
        self._user: str | None = None
        self._password: str | None = None
        self._token: str | None = None
        if info is not None:
            # As nats-py reads a URL's: a user and a password, or a token alone; as written.
            user, has_password, password = info.partition(":")
            if has_password:
                self._user, self._password = user, password
            else:
                self._token = info
        self._client: _Client | None = None
        self._inbox = b""  # the reply subjects' prefix on the current connection
        self._connecting = asyncio.Lock()
        # Reply token -> the batch and place its acknowledgement goes to. Tokens are never
        # reused, so an acknowledgement that comes after its batch gave up finds nothing.
        self._waiting: dict[bytes, tuple[_Batch, int]] = {}
        self._serial = 0
        self._failure: BaseException | None = None  # nats-py's last error, see _CannotConnect
        self._closing: set[asyncio.Task[None]] = set()  # connections let go (_let_go)

    async def _connected(self) -> _Client:
        """The connection, made now if there is none (or the last one was lost for good), with
        the subscription its acknowledgements arrive on."""
        client = self._client
        if client is not None and not client.is_closed:
            return client  # the usual case, without taking the lock
        async with self._connecting:
            if self._client is not None and not self._client.is_closed:
                return self._client
            client = _Client(self._on_reply)
            self._failure = None
            try:
                async with asyncio.timeout(self.target.timeout_s):
                    await client.connect(
                        servers=self._servers,
                        # Each server's share of timeout_s, tried twice each: a server that
                        # takes the TCP connection and then says nothing (frozen, or half of a
                        # partition) must leave time for the next one within this attempt.
                        connect_timeout=_connect_timeout_s(
                            self.target.timeout_s, len(self._servers)
                        ),
                        # Each server tried twice, then the connection is given up: the
                        # dispatcher's retries and backoff decide when to connect again, so a
                        # broker that is down costs an attempt, not a wait of timeout_s.
                        reconnect_time_wait=0,
                        max_reconnect_attempts=1,
                        allow_reconnect=True,
                        error_cb=self._on_error,
                        disconnected_cb=self._on_disconnected,
                        reconnected_cb=self._on_reconnected,
                        user=self._user,
                        password=self._password,
                        token=self._token,
                        # None: nats-py's default context, with a server that requires TLS.
                        tls=self._tls,
                    )
                    # One inbox for every reply on this connection; nats-py subscribes it
                    # again, with the same id, on a reconnect.
                    inbox = client.new_inbox() + "."
                    subscription = await client.subscribe(inbox + "*")
                    client.reply_sid = subscription._id
            except BaseException as exc:
                await client.close()
                failure = self._failure
                if failure is not None and isinstance(
                    exc, TimeoutError | nats.errors.NoServersError
                ):
                    raise _CannotConnect(failure) from exc
                raise
            self._client, self._inbox = client, inbox.encode()
            return client

    async def _on_error(self, exc: Exception) -> None:
        self._failure = exc
        log.debug("target %s: nats: %s", self.target.name, exc)

    async def _on_disconnected(self) -> None:
        log.info("target %s: disconnected from NATS; reconnecting", self.target.name)

    async def _on_reconnected(self) -> None:
        log.info("target %s: reconnected to NATS", self.target.name)

    def _on_reply(self, subject: bytes, data: bytes, headers: bytes | None) -> None:
        slot = self._waiting.pop(subject.rpartition(b".")[2], None)
        if slot is None:
            return  # its batch timed out or was stopped
        batch, index = slot
        status = None
        if headers is not None and headers.startswith(b"NATS/1.0 "):
            status = headers[9:12].decode("ascii", "replace")  # "NATS/1.0 503\r\n..."
        result = ack_result(status, data, batch.deliveries[index].body)
        batch.results[index] = result or AttemptResult(error=self._no_stream(), permanent=True)
        batch.left -= 1
        if batch.left == 0 and not batch.done.done():
            batch.done.set_result(None)

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
        batch = _Batch(deliveries)
        results = batch.results
        most = client.max_payload
        head = b"HPUB %s %s" % (self._subject.encode(), self._inbox)
        parts: list[bytes] = []
        tokens: list[bytes] = []
        for index, (delivery, attempt) in enumerate(zip(deliveries, attempts, strict=True)):
            headers = delivery_headers(delivery, self.target, attempt, now)
            if trace_headers is not None:
                for name, value in trace_headers[index].items():
                    headers[name] = value.translate(_NO_NEWLINES)
            # Dropped by the stream as a duplicate if it was stored already.
            headers["Nats-Msg-Id"] = delivery.id
            block = header_block(headers)
            body = delivery.body
            # The server counts headers and data against max_payload, and closes the whole
            # connection on a message over it: refused here, with a reason, instead.
            size = len(block) + len(body)
            if size > most:
                results[index] = AttemptResult(
                    error=f"nats: message of {size} bytes is over the server's max_payload"
                    f' ({most} bytes): use split = "change" or raise max_payload',
                    permanent=True,
                )
                continue
            self._serial += 1
            token = b"%d" % self._serial
            tokens.append(token)
            self._waiting[token] = (batch, index)
            parts += (b"%s%s %d %d\r\n" % (head, token, len(block), size), block, body)
            parts.append(b"\r\n")
        if not tokens:
            return results
        batch.left = len(tokens)
        try:
            # The write too: it waits for room in the socket's buffer, which a broker that
            # stops reading (frozen, partitioned) never makes. What was written goes on when it
            # reads again; a retry meanwhile is dropped as a duplicate by its Nats-Msg-Id.
            async with asyncio.timeout(self.target.timeout_s):
                await _publish(client, b"".join(parts))
                await batch.done
        except TimeoutError:
            if batch.left == len(tokens):
                self._let_go(client)
        except (OSError, nats.errors.Error) as exc:
            failed = AttemptResult(error=f"nats: {_reason(exc)}"[:300])
            for token in tokens:
                slot = self._waiting.pop(token, None)
                if slot is not None:
                    results[slot[1]] = failed
        finally:
            late = AttemptResult(error=f"nats: no acknowledgement in {self.target.timeout_s:g}s")
            for token in tokens:
                slot = self._waiting.pop(token, None)
                if slot is not None:
                    results[slot[1]] = late
        return results

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

    def _let_go(self, client: _Client) -> None:
        """Not one acknowledgement of a batch in timeout_s: the connection may be dead without
        knowing it (a broker gone without closing it, a partition), which nats-py's pings find
        out only after ping_interval times max_outstanding_pings, minutes; until then every
        batch would wait out its timeout on it. It is let go, so that the next batch connects
        again, to another server of the list if this one is gone. Closed in the background,
        within a time limit: closing flushes, and a dead connection takes nothing."""
        if self._client is client:
            self._client = None
            log.info(
                "target %s: no acknowledgement from NATS in %gs; connecting again",
                self.target.name,
                self.target.timeout_s,
            )
            closing = asyncio.create_task(_close_within(client, self.target.timeout_s))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


def _connect_timeout_s(timeout_s: float, servers: int) -> int:
    """nats-py's connect_timeout (whole seconds, at least one): each server's share of
    ``timeout_s``, every server being tried twice within one attempt."""
    return max(1, int(timeout_s / (2 * max(1, servers))))


async def _close_within(client: Client, timeout_s: float) -> None:
    with contextlib.suppress(TimeoutError, OSError, nats.errors.Error):
        async with asyncio.timeout(timeout_s):
            await client.close()


async def _publish(client: Client, data: bytes) -> None:
    """Write ``data`` (whole HPUB messages) on the connection now, behind whatever nats-py has
    queued, refusing as its ``publish()`` does on a connection that cannot take it now. A
    connection that is reconnecting is refused too, rather than buffered: the deliveries are
    retried with backoff instead of waiting for a server that may not return.

    Written here rather than by nats-py's flusher task, which ``publish()`` wakes through a
    queue: that is one more task step, and one more turn of the event loop, for every batch,
    which in the gateway (mostly one batch out at a time, as notifications arrive) cost more
    than the rest of a small batch's publish."""
    if client.is_closed:
        raise nats.errors.ConnectionClosedError
    if client.is_draining_pubs:
        raise nats.errors.ConnectionDrainingError
    if not client.is_connected or client._transport is None:
        raise nats.errors.ConnectionReconnectingError
    # Behind whatever nats-py has queued (the reply subscription's SUB first), never ahead:
    # the flusher writes the same list, so whichever runs first writes it all, in order. Not
    # through nats-py's _send_command, which over max_pending_size waits for the flusher in a
    # way that swallows a cancellation, the deadline of send_many's timeout.
    pending, client._pending, client._pending_data_size = client._pending, [], 0
    pending.append(data)
    client._transport.writelines(pending)
    # Returns at once unless the socket's buffer is full (nats-py leaves it untyped).
    await client._transport.drain()  # type: ignore[no-untyped-call]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, _CannotConnect):
        exc = exc.failure
    if isinstance(exc, _NotTls):
        return str(exc)
    return f"{type(exc).__name__}: {exc}".rstrip(": ") if str(exc) else type(exc).__name__


def _hosts(servers: Sequence[str]) -> str:
    """Hosts and ports, never credentials."""
    return ",".join(
        f"{urlsplit(server).hostname}:{urlsplit(server).port or 4222}" for server in servers
    )
