"""The forwarder's keep-alive HTTP/1.1 client against raw servers (gateway.delivery.upstream)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import pytest
from helpers import read_message

from gateway.delivery.upstream import Response, Upstream, UpstreamError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


def keep_alive(server_ref: list[Server], reply: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            server_ref[0].requests.append(await read_message(reader))
            writer.write(reply)
            await writer.drain()

    return handler


class UpstreamTo(Protocol):
    def __call__(self, port: int, path: str = "/") -> Upstream: ...


@pytest.fixture
async def upstream_to() -> AsyncIterator[UpstreamTo]:
    """``upstream_to(port, path="/")``: an Upstream to that port on 127.0.0.1, closed after the
    test."""
    made: list[Upstream] = []

    def make(port: int, path: str = "/") -> Upstream:
        made.append(Upstream(f"http://127.0.0.1:{port}{path}"))
        return made[-1]

    yield make
    for upstream in made:
        await upstream.close()


async def _serve(reply: bytes) -> Server:
    ref: list[Server] = []
    server = Server(keep_alive(ref, reply))
    ref.append(server)
    return server


async def test_posts_exact_body_and_reuses_the_connection(upstream_to: UpstreamTo) -> None:
    """Requests carry Host, Content-Length and the body; keep-alive reuses one connection."""
    async with await _serve(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") as server:
        upstream = upstream_to(server.port, "/hook?x=1")
        for n in range(3):
            response = await upstream.post({"X-N": str(n)}, b'{"n":"\\u00e9"}', 5)
            assert (response.status, response.excerpt) == (200, b"ok")
        assert server.connections == 1
        head, body = server.requests[2]
        assert head.startswith(b"POST /hook?x=1 HTTP/1.1\r\n")
        assert f"Host: 127.0.0.1:{server.port}\r\n".encode() in head
        assert b"X-N: 2\r\n" in head
        assert body == b'{"n":"\\u00e9"}'


@pytest.mark.parametrize(
    ("reply", "status", "excerpt", "retry_after"),
    [
        (
            b"HTTP/1.1 503 Unavailable\r\nRetry-After: 7\r\nContent-Length: 4\r\n\r\nbusy",
            503,
            b"busy",
            "7",
        ),
        (
            b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nbad\r\n2\r\n!!\r\n0\r\n\r\n",
            400,
            b"bad!!",
            None,
        ),
        (b"HTTP/1.1 204 No Content\r\n\r\n", 204, b"", None),
    ],
    ids=["retry-after", "chunked", "no-body"],
)
async def test_reads_status_retry_after_and_body_excerpt(
    upstream_to: UpstreamTo, reply: bytes, status: int, excerpt: bytes, retry_after: str | None
) -> None:
    """Status, Retry-After and the body (chunked or not) come back parsed."""
    async with await _serve(reply) as server:
        upstream = upstream_to(server.port)
        response = await upstream.post({}, b"{}", 5)
        assert (response.status, response.excerpt, response.retry_after) == (
            status,
            excerpt,
            retry_after,
        )


async def test_body_until_close_is_a_complete_response(upstream_to: UpstreamTo) -> None:
    """A response delimited by the connection closing still counts, and is not reused."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_message(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\ndone")
        await writer.drain()

    async with Server(handler) as server:
        upstream = upstream_to(server.port)
        assert (await upstream.post({}, b"{}", 5)).excerpt == b"done"
        assert (await upstream.post({}, b"{}", 5)).status == 200
        assert server.connections == 2


async def test_idle_connection_closed_by_target_is_retried_once_on_a_new_one(
    upstream_to: UpstreamTo,
) -> None:
    """A keep-alive connection the target closed while idle does not fail the delivery."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_message(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        # Then, like a keep-alive timeout, close without answering anything more.

    async with Server(handler) as server:
        upstream = upstream_to(server.port)
        assert (await upstream.post({}, b"1", 5)).status == 200
        await asyncio.sleep(0.1)
        assert (await upstream.post({}, b"2", 5)).status == 200
        assert server.connections == 2


async def test_refused_connection_and_garbage_are_upstream_errors(upstream_to: UpstreamTo) -> None:
    """Nothing listening, or a reply that is not HTTP, raise UpstreamError with a reason."""

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_message(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async with Server(garbage) as server:
        upstream = upstream_to(server.port)
        with pytest.raises(UpstreamError, match="invalid HTTP response"):
            await upstream.post({}, b"{}", 5)
    refused = upstream_to(server.port)
    with pytest.raises(UpstreamError, match="cannot connect"):
        await refused.post({}, b"{}", 5)


@pytest.mark.parametrize(
    "host", ["inbox..internal", f"{'x' * 64}.internal"], ids=["an empty label", "a label over 63"]
)
async def test_a_host_name_the_resolver_refuses_is_an_upstream_error(host: str) -> None:
    """A target host DNS cannot carry makes each attempt fail as unreachable (the dispatcher
    retries it, then dead-letters), never an exception out of the sender."""
    upstream = Upstream(f"http://{host}:8080/hook")
    try:
        with pytest.raises(UpstreamError, match="cannot connect"):
            await upstream.post({}, b"{}", 5)
    finally:
        await upstream.close()


async def test_silent_target_times_out(upstream_to: UpstreamTo) -> None:
    """A target that never answers raises TimeoutError after timeout_s."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_message(reader)
        await asyncio.sleep(5)

    async with Server(silent) as server:
        upstream = upstream_to(server.port)
        with pytest.raises(TimeoutError):
            await upstream.post({}, b"{}", 0.2)


async def test_warm_opens_a_connection_the_first_post_reuses(upstream_to: UpstreamTo) -> None:
    """warm() pools a connection ahead of time; warming a target that is down is no error."""
    async with await _serve(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") as server:
        upstream = upstream_to(server.port)
        await upstream.warm(5)
        assert (await upstream.post({}, b"{}", 5)).status == 200
        assert server.connections == 1
    down = upstream_to(server.port)
    await down.warm(5)


def _status_of(body: bytes) -> bytes:
    """A reply whose status is the request's body, so each answer names its request."""
    return b"HTTP/1.1 %s OK\r\nContent-Length: 0\r\n\r\n" % body


async def test_pipelines_a_batch_on_one_connection_and_matches_answers_in_order(
    upstream_to: UpstreamTo,
) -> None:
    """post_many writes all requests before the first answer, on one connection, and each
    result is the answer to its own request (RFC 9112 section 9.3.2: responses in order)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Answer nothing until all five requests are in: only a pipelining client gets answers.
        bodies = []
        for _ in range(5):
            bodies.append((await read_message(reader))[1])
        for body in bodies:
            writer.write(_status_of(body))
        await writer.drain()
        await read_message(reader)

    async with Server(handler) as server:
        upstream = upstream_to(server.port)
        statuses = [b"201", b"202", b"503", b"204", b"400"]
        answers = await upstream.post_many([({}, status) for status in statuses], 5)
        assert [a.status for a in answers if isinstance(a, Response)] == [201, 202, 503, 204, 400]
        assert server.connections == 1


async def test_requests_behind_a_connection_close_answer_are_sent_again(
    upstream_to: UpstreamTo,
) -> None:
    """A target that answers one request per connection and closes ("Connection: close")
    processed none of the requests behind it (RFC 9112 section 9.6): they go again on new
    connections, and every request gets its own answer, none an error."""

    async def one_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        _, body = await read_message(reader)
        writer.write(b"HTTP/1.1 %s OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n" % body)
        await writer.drain()

    async with Server(one_per_connection) as server:
        upstream = upstream_to(server.port)
        answers = await upstream.post_many([({}, b"%d" % (200 + n)) for n in range(4)], 5)
        assert [a.status for a in answers if isinstance(a, Response)] == [200, 201, 202, 203]
        assert server.connections == 4


async def test_connection_broken_mid_batch_fails_only_the_unanswered(
    upstream_to: UpstreamTo,
) -> None:
    """A target that answers two requests, then drops the connection without a word: those
    two have their answers, the rest an UpstreamError (they may have been processed, so they
    are failed attempts, not silently sent again)."""

    async def drops_after_two(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            _, body = await read_message(reader)
            writer.write(_status_of(body))
        await writer.drain()
        await read_message(reader)

    async with Server(drops_after_two) as server:
        upstream = upstream_to(server.port)
        answers = await upstream.post_many([({}, b"%d" % (200 + n)) for n in range(4)], 5)
        assert [getattr(a, "status", None) for a in answers[:2]] == [200, 201]
        assert all(isinstance(a, UpstreamError) for a in answers[2:])
        assert server.connections == 1


def _answers_one_then_falls_silent(silent_s: float) -> Handler:
    """A target that answers the first request (with the status its body names), then says
    nothing for ``silent_s``."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, body = await read_message(reader)
        writer.write(_status_of(body))
        await writer.drain()
        await asyncio.sleep(silent_s)

    return handler


async def test_each_response_has_its_own_timeout(upstream_to: UpstreamTo) -> None:
    """The first request is answered, then the target falls silent: the answered one keeps its
    response, the others time out, and the connection is not reused."""

    async with Server(_answers_one_then_falls_silent(5)) as server:
        upstream = upstream_to(server.port)
        answers = await upstream.post_many([({}, b"200"), ({}, b"201"), ({}, b"202")], 0.3)
        assert isinstance(answers[0], Response)
        assert answers[0].status == 200
        assert all(isinstance(a, TimeoutError) for a in answers[1:])
        assert not upstream._idle


async def _unretrieved(exchange: Callable[[], Awaitable[object]]) -> list[str]:
    """What asyncio reported, as its exception handler's messages, while ``exchange`` ran and
    once every future it left was collected."""
    loop = asyncio.get_running_loop()
    reports: list[str] = []
    loop.set_exception_handler(lambda _, context: reports.append(str(context.get("message"))))
    try:
        await exchange()
        await asyncio.sleep(0.05)  # the connection's end, and the callbacks it schedules
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    return reports


async def test_answers_given_up_on_leave_no_error_unretrieved(upstream_to: UpstreamTo) -> None:
    """A batch whose later answers are given up on (a timeout, then the connection's end)
    leaves no "Future exception was never retrieved" in the log."""

    async with Server(_answers_one_then_falls_silent(0.5)) as server:
        upstream = upstream_to(server.port)

        async def batch() -> None:
            answers = await upstream.post_many([({}, b"%d" % (200 + n)) for n in range(4)], 0.2)
            assert [type(a) for a in answers] == [Response] + [TimeoutError] * 3

        assert await _unretrieved(batch) == []


async def test_a_batch_sent_again_after_a_stale_connection_leaves_no_error_unretrieved(
    upstream_to: UpstreamTo,
) -> None:
    """A pooled connection the target closes as the batch arrives, without a byte of answer
    (a keep-alive timeout that crossed the requests), fails every request written to it; they
    go again on a new one, and the failures of the first try leave no "Future exception was
    never retrieved" behind."""
    first = asyncio.Event()

    async def closes_the_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not first.is_set():
            first.set()
            await read_message(reader)
            return  # closed with nothing answered
        while True:
            _, body = await read_message(reader)
            writer.write(_status_of(body))
            await writer.drain()

    async with Server(closes_the_first) as server:
        upstream = upstream_to(server.port)
        await upstream.warm(5)  # the first connection, in the pool

        async def batch() -> None:
            answers = await upstream.post_many([({}, b"%d" % (200 + n)) for n in range(4)], 5)
            assert [getattr(a, "status", None) for a in answers] == [200, 201, 202, 203]

        assert await _unretrieved(batch) == []
        assert server.connections == 2


async def test_a_cancelled_batch_leaves_no_error_unretrieved(upstream_to: UpstreamTo) -> None:
    """A batch cancelled while it waits (a reload, a stop) leaves no "Future exception was
    never retrieved" for the answers it no longer waits for."""
    asked = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_message(reader)
        asked.set()
        await asyncio.sleep(5)

    async with Server(silent) as server:
        upstream = upstream_to(server.port)

        async def batch() -> None:
            task = asyncio.create_task(upstream.post_many([({}, b"200"), ({}, b"201")], 5))
            await asked.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        assert await _unretrieved(batch) == []
