"""What the broker senders put on the wire and read back from it: Redis ``XADD`` commands and
their replies, NATS message headers and JetStream's acknowledgements, and a broker that stops
answering mid-batch.

The encodings are checked against the protocols' own parsers (hiredis reads RESP whichever way
it goes); the replies are read from a real loopback connection, split at every byte; the
brokers are real ``redis-server`` and ``nats-server -js`` (tests/support/brokers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import hiredis
import pytest
import redis.asyncio as aioredis
from brokers import BrokerServer, pending_delivery
from destinations import NatsDestination, RedisDestination
from redis.exceptions import ConnectionError, InvalidResponse, ResponseError

from gateway.config import TargetConfig
from gateway.delivery.nats_jetstream import JetStreamSender, ack_result, header_block
from gateway.delivery.redis_stream import RedisStreamSender, read_replies, xadd_commands
from gateway.delivery.sending import Sender
from gateway.outbox.model import AttemptResult


@pytest.mark.parametrize(
    ("head", "fields"),
    [
        pytest.param((b"XADD", b"s", b"*"), {"X-Gateway-Attempt": "1"}, id="plain"),
        pytest.param(
            (b"XADD", b"s", b"MAXLEN", b"~", b"1000", b"*"),
            {"X-Gateway-Delivery-Id": "d-1", "X-Gateway-Attempt": "12"},
            id="maxlen",
        ),
        pytest.param(
            (b"XADD", "café".encode(), b"*"),
            {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "tracestate": "k=v"},
            id="utf8-key-and-trace",
        ),
        pytest.param((b"XADD", b"s", b"*"), {}, id="no-fields"),
    ],
)
def test_xadd_commands_are_resp_arrays_holding_the_exact_body_and_fields(
    head: tuple[bytes, ...], fields: dict[str, str]
) -> None:
    """Each delivery is one RESP array: the head, ``body`` and its exact bytes, then every
    field, as a RESP parser reads them back."""
    bodies = [b'{"a":"\r\n$3\r\n"}', b"", bytes(range(256))]
    deliveries = [pending_delivery(n, body, "w") for n, body in enumerate(bodies)]
    packed = xadd_commands(head, deliveries, [fields] * len(deliveries))
    reader = hiredis.Reader()
    reader.feed(packed)
    flat = [part.encode() for pair in fields.items() for part in pair]
    for body in bodies:
        assert reader.gets() == [*head, b"body", body, *flat]
    assert reader.gets() is False  # nothing more


def _server_writing(
    chunks: list[bytes],
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def serve(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0)
        writer.close()

    return serve


@contextlib.asynccontextmanager
async def _reading(chunks: list[bytes]) -> AsyncIterator[asyncio.StreamReader]:
    """A loopback connection whose other end writes ``chunks``, one at a time, then closes."""
    server = await asyncio.start_server(_server_writing(chunks), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


_REPLIES = b"$3\r\n1-0\r\n-WRONGTYPE not a stream\r\n$13\r\n1700000000-12\r\n"


def _splits() -> Iterator[list[bytes]]:
    yield [_REPLIES]
    yield [bytes([byte]) for byte in _REPLIES]
    for cut in range(1, len(_REPLIES)):
        yield [_REPLIES[:cut], _REPLIES[cut:]]


@pytest.mark.parametrize("chunks", list(_splits()))
async def test_replies_are_read_whichever_way_the_bytes_arrive(chunks: list[bytes]) -> None:
    """Three replies, cut anywhere across reads: each in its place, the error reply an
    exception value that leaves the others alone."""
    async with _reading(chunks) as stream:
        first, error, last = await read_replies(stream, 3)
    assert first == b"1-0"
    assert isinstance(error, ResponseError)
    assert str(error) == "WRONGTYPE not a stream"
    assert last == b"1700000000-12"


@pytest.mark.parametrize(
    ("chunks", "error", "message"),
    [
        pytest.param([b"$3\r\n1-0\r\n"], ConnectionError, "closed", id="closed-before-the-last"),
        pytest.param([b"$3\r\n1-"], ConnectionError, "closed", id="closed-mid-reply"),
        pytest.param([b"?what\r\n"], InvalidResponse, "Protocol error", id="not-resp"),
        pytest.param([_REPLIES], InvalidResponse, "more replies", id="more-than-asked"),
    ],
)
async def test_replies_that_cannot_be_trusted_raise(
    chunks: list[bytes], error: type[Exception], message: str
) -> None:
    """A connection that ends early, bytes that are not RESP, or replies nobody asked for: an
    error for the whole exchange (the sender drops that connection), never a guess."""
    async with _reading(chunks) as stream:
        with pytest.raises(error, match=message):
            await read_replies(stream, 2)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param(
            {"X-Gateway-Delivery-Id": "d-1", "Nats-Msg-Id": "d-1"},
            b"NATS/1.0\r\nX-Gateway-Delivery-Id: d-1\r\nNats-Msg-Id: d-1\r\n\r\n",
            id="two",
        ),
        pytest.param(
            {"X-Gateway-Attempt": "100%"},
            b"NATS/1.0\r\nX-Gateway-Attempt: 100%\r\n\r\n",
            id="percent-in-a-value",
        ),
        pytest.param({}, b"NATS/1.0\r\n\r\n", id="none"),
    ],
)
def test_header_block_is_what_hpub_carries(headers: dict[str, str], expected: bytes) -> None:
    """The version line, one ``name: value`` line per header in order, an empty line; the
    same set of names with other values gives their block, not a cached one."""
    assert header_block(headers) == expected
    other = {name: value + "x" for name, value in headers.items()}
    lines = b"".join(f"{name}: {value}\r\n".encode() for name, value in other.items())
    assert header_block(other) == b"NATS/1.0\r\n" + lines + b"\r\n"


@pytest.mark.parametrize(
    ("status", "data", "expected"),
    [
        pytest.param(
            None,
            b'{"stream":"WABA","seq":7}',
            AttemptResult(accepted=True, response_excerpt="stream WABA"),
            id="stored",
        ),
        pytest.param(
            None,
            b'{"stream":"WABA","seq":7,"duplicate":true}',
            AttemptResult(
                accepted=True, response_excerpt="stream WABA (a duplicate, already stored)"
            ),
            id="duplicate",
        ),
        pytest.param(
            None,
            b'{"error":{"code":400,"err_code":10054,"description":"message size exceeds maximum'
            b' allowed"}}',
            AttemptResult(error="nats: message size exceeds maximum allowed", permanent=True),
            id="too-large-is-permanent",
        ),
        pytest.param(
            None,
            b'{"error":{"code":503,"err_code":10077,"description":"resource limits exceeded"}}',
            AttemptResult(error="nats: resource limits exceeded"),
            id="other-errors-are-transient",
        ),
        pytest.param(
            None,
            b'{"error":"unexpected"}',
            AttemptResult(error="nats: unexpected"),
            id="error-without-details",
        ),
        pytest.param("503", b"", None, id="no-stream"),
        pytest.param(
            None,
            b'{"seq":7}',
            AttemptResult(error="nats: not a publish acknowledgement: '{\"seq\":7}'"),
            id="no-stream-name",
        ),
        pytest.param(
            "408", b"", AttemptResult(error="nats: not a publish acknowledgement: ''"), id="empty"
        ),
    ],
)
def test_each_jetstream_answer_is_one_attempt_result(
    status: str | None, data: bytes, expected: AttemptResult | None
) -> None:
    """Only an acknowledgement naming its stream and sequence is a delivery; a message over
    the stream's limit is a dead letter; no responders means no stream; anything else retries."""
    assert ack_result(status, data) == expected


@pytest.mark.parametrize("kind", ["redis", "nats"])
async def test_broker_that_stops_answering_fails_the_batch_then_serves_again(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """A broker frozen mid-exchange (SIGSTOP): every delivery of the batch is a failed attempt
    after timeout_s, nothing is left waiting, and once it runs again the next batch is
    delivered on a fresh exchange."""
    server: BrokerServer = request.getfixturevalue(kind)
    sender: Sender
    if kind == "redis":
        await RedisDestination(server).flush()
        sender = RedisStreamSender(
            TargetConfig(name="t", kind="redis", url=server.url, stream="frozen", timeout_s=0.5)
        )
    else:
        await NatsDestination(server).reset()
        sender = JetStreamSender(
            TargetConfig(
                name="t", kind="nats", url=server.url, subject="waba.frozen", timeout_s=0.5
            )
        )
    try:
        assert all(
            r.accepted for r in await sender.send_many([pending_delivery(0, prefix="w")], [1])
        )
        with server.frozen():
            results = await sender.send_many(
                [pending_delivery(n, prefix="w") for n in range(1, 9)], [1] * 8
            )
        assert all(not r.accepted and not r.permanent for r in results), results
        assert all(
            "timed out" in (r.error or "") or "no acknowledgement" in (r.error or "")
            for r in results
        )
        if isinstance(sender, JetStreamSender):
            assert not sender._waiting  # no acknowledgement is awaited any longer
        again = await sender.send_many(
            [pending_delivery(n, prefix="w") for n in range(9, 12)], [1] * 3
        )
        assert all(r.accepted for r in again), again
    finally:
        await sender.close()


async def test_redis_exchange_is_bounded_by_the_target_timeout_alone(redis: BrokerServer) -> None:
    """No socket timeout of redis-py's own (5 s by default since redis-py 8): it would wrap
    every write in a task and a timer; the target's timeout_s bounds each batch instead."""
    target = TargetConfig(name="t", kind="redis", url=redis.url, stream="s", timeout_s=7)
    sender = RedisStreamSender(target)
    try:
        assert sender._client.connection_pool.connection_kwargs["socket_timeout"] is None
        (result,) = await sender.send_many([pending_delivery(1, prefix="w")], [1])
        assert result.accepted
    finally:
        await sender.close()


async def test_redis_sender_keeps_its_connections_between_batches(redis: BrokerServer) -> None:
    """Batches one after another reuse the connection the last one used, without the pool's
    get and release each time; batches in flight together each take their own."""
    sender = RedisStreamSender(TargetConfig(name="t", kind="redis", url=redis.url, stream="kept"))
    pool = sender._client.connection_pool
    taken = 0
    get_connection = pool.get_connection

    async def counted() -> object:
        nonlocal taken
        taken += 1
        return await get_connection()  # type: ignore[no-untyped-call]

    pool.get_connection = counted  # type: ignore[method-assign,assignment]
    try:
        for n in range(5):
            assert all(
                r.accepted for r in await sender.send_many([pending_delivery(n, prefix="w")], [1])
            )
        assert taken == 1
        batches = [sender.send_many([pending_delivery(n, prefix="w")], [1]) for n in range(5, 8)]
        assert all(r.accepted for results in await asyncio.gather(*batches) for r in results)
        assert taken == 3
        for n in range(8, 12):
            assert all(
                r.accepted for r in await sender.send_many([pending_delivery(n, prefix="w")], [1])
            )
        assert taken == 3
    finally:
        await sender.close()
    assert not pool._in_use_connections  # close gave every kept connection back to be closed


async def test_redis_connection_the_server_closed_between_batches_is_replaced(
    redis: BrokerServer,
) -> None:
    """A kept connection the server has closed since its last batch (a restart, a client
    timeout, CLIENT KILL) is not written to: the next batch goes on a new connection."""
    await RedisDestination(redis).flush()
    sender = RedisStreamSender(TargetConfig(name="t", kind="redis", url=redis.url, stream="k"))
    admin = aioredis.Redis.from_url(redis.url)
    try:
        assert all(
            r.accepted for r in await sender.send_many([pending_delivery(0, prefix="w")], [1])
        )
        (kept,) = sender._idle
        assert await admin.client_kill_filter(_type="normal", skipme=True) == 1
        for _ in range(500):  # until this end has seen the server close it
            if kept._reader is None or kept._reader.at_eof():
                break
            await asyncio.sleep(0.01)
        results = await sender.send_many(
            [pending_delivery(n, prefix="w") for n in range(1, 4)], [1] * 3
        )
        assert all(r.accepted for r in results), results
        assert await admin.xlen("k") == 4
    finally:
        await admin.aclose()
        await sender.close()


async def test_nats_batches_written_at_once_and_together_are_each_stored_once(
    nats: BrokerServer,
) -> None:
    """A batch's messages are written by the sender itself, behind nats-py's queue: batches
    out together and a batch larger than the socket's buffer (the write waits for room) are
    each acknowledged, and the stream holds every message once."""
    destination = NatsDestination(nats)
    await destination.reset()
    sender = JetStreamSender(destination.target("together"))
    big = b"x" * 200_000  # 24 of them: more than a loopback socket buffers at once
    try:
        batches = [[pending_delivery(n * 10 + i, prefix="g") for i in range(5)] for n in range(6)]
        batches.append([pending_delivery(100 + i, big, prefix="g") for i in range(24)])
        answers = await asyncio.gather(
            *(sender.send_many(batch, [1] * len(batch)) for batch in batches)
        )
        assert all(r.accepted for results in answers for r in results), answers
        assert not sender._waiting
    finally:
        await sender.close()
    received = await destination.received("together")
    ids = sorted(r.headers["X-Gateway-Delivery-Id"] for r in received)
    assert ids == sorted(d.id for batch in batches for d in batch)


async def test_nats_writes_to_a_broker_that_stops_reading_end_within_timeout_s(
    nats: BrokerServer,
) -> None:
    """Batches out together to a frozen broker, more than the loopback socket buffers hold: a
    batch's write waits for room under the same deadline as its acknowledgements, so each one
    is a failed attempt after timeout_s rather than a wait for the broker to read again; once it
    does, deliveries go on (what was written meanwhile is stored once, by its Nats-Msg-Id)."""
    destination = NatsDestination(nats)
    await destination.reset()
    sender = JetStreamSender(destination.target("stalled", timeout_s=0.5))
    big = b"x" * 200_000
    batches = [
        [pending_delivery(n * 10 + i, big, prefix="s") for i in range(4)] for n in range(1, 9)
    ]
    try:
        (first,) = await sender.send_many([pending_delivery(0, prefix="s")], [1])
        assert first.accepted
        with nats.frozen():
            started = time.monotonic()
            sending = asyncio.gather(*(sender.send_many(batch, [1] * 4) for batch in batches))
            answers = await asyncio.wait_for(sending, 10)
            took = time.monotonic() - started
        assert took < 2, f"{took:.1f}s with timeout_s = 0.5"
        assert all(not r.accepted and not r.permanent for rs in answers for r in rs), answers
        assert not sender._waiting
        for attempt in range(1, 6):  # the broker may take a while over what it has to read
            (again,) = await sender.send_many([pending_delivery(100, prefix="s")], [attempt])
            if again.accepted:
                break
        assert again.accepted, again
    finally:
        await asyncio.wait_for(sender.close(), 10)
    ids = [r.headers["X-Gateway-Delivery-Id"] for r in await destination.received("stalled")]
    assert len(ids) == len(set(ids))
