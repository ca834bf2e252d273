"""A target server for the end-to-end tests: it records every request and answers as told.

Rule: the sink is a real HTTP server on 127.0.0.1, started and stopped explicitly, so the
gateway's forwarder meets real sockets. It answers each request with the next scripted
:class:`Reply` or :class:`Hang` (see :meth:`Sink.script`), then with :attr:`Sink.default`.
:meth:`Sink.down` and :meth:`Sink.up` stop it and start it again on the same port, so a target
that goes away and comes back looks exactly like that to the gateway. Several targets can share
one sink: each is given its own path (:meth:`Sink.url`), and :meth:`Sink.at` tells them apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = ["DEADLINE_S", "Hang", "Received", "Reply", "Sink"]

# How long a test waits for something that should happen: generous, since a busy CI machine
# is slow, and never spent when the condition holds sooner.
DEADLINE_S = 15.0
_POLL_S = 0.01
# Meta sends up to 3 MB; aiohttp's own default (1 MiB) would refuse large forwarded bodies.
_MAX_BODY_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Received:
    """One request as the sink saw it: the raw body bytes, never a re-serialised copy."""

    path: str
    headers: CIMultiDictProxy[str]
    body: bytes
    # time.monotonic() when it arrived: only ever compared with another request's.
    at: float


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer ``status`` with ``headers`` and ``body``."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: str = "ok"


@dataclass(frozen=True, slots=True)
class Hang:
    """Hold the request for ``seconds`` (less if the sink stops), then answer 200: a target
    slower than the gateway's timeout."""

    seconds: float = 5.0


Plan = Reply | Hang


class Sink:
    """``async with Sink() as sink``: listening on 127.0.0.1 until the block ends."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.default: Plan = Reply()
        self.port = 0
        self._script: deque[Plan] = deque()
        self._runner: web.AppRunner | None = None
        self._released = asyncio.Event()
        # While down: the port, bound but not listening (connections are refused), so that no
        # other process is handed it meanwhile (the kernel gives its ports to any connect()).
        self._held: socket.socket | None = None

    async def __aenter__(self) -> Self:
        await self.up()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.down()
        self._release_port()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def script(self, *plans: Plan) -> None:
        """Answer the next requests with ``plans``, in order, whatever their path."""
        self._script.extend(plans)

    def at(self, path: str) -> list[Received]:
        """The requests received on ``path``, oldest first."""
        return [request for request in self.received if request.path == path]

    async def up(self) -> None:
        """Start listening: on a free port the first time, on the same port afterwards."""
        assert self._runner is None, "the sink is already up"
        app = web.Application(client_max_size=_MAX_BODY_BYTES)
        app.router.add_route("*", "/{path:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        # SO_REUSEADDR: the port is free again at once, even with connections in TIME_WAIT, and
        # binds beside the socket that held it while down (which does not listen).
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._release_port()
        self.port = int(runner.addresses[0][1])
        self._released = asyncio.Event()
        self._runner = runner

    async def down(self) -> None:
        """Stop listening (connections are refused) and close open connections. The port
        stays this sink's until :meth:`up`, or the end of its ``async with`` block."""
        if self._runner is None:
            return
        self._released.set()  # hanging requests end now
        runner, self._runner = self._runner, None
        await runner.cleanup()
        held = socket.socket()
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            held.bind(("127.0.0.1", self.port))
        except OSError:
            held.close()  # taken already: up() will say so
        else:
            self._held = held

    def _release_port(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None

    async def wait_for(self, count: int, path: str | None = None) -> list[Received]:
        """At least ``count`` requests (on ``path``, if given), as soon as they are there."""

        def seen() -> list[Received]:
            return self.received if path is None else self.at(path)

        deadline = time.monotonic() + DEADLINE_S
        while len(seen()) < count:
            if time.monotonic() > deadline:
                where = "" if path is None else f" on {path}"
                raise AssertionError(
                    f"the sink received {len(seen())} request(s){where}, expected {count}"
                )
            await asyncio.sleep(_POLL_S)
        return seen()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = CIMultiDictProxy(CIMultiDict(request.headers))
        self.received.append(Received(request.path, headers, body, time.monotonic()))
        plan = self._script.popleft() if self._script else self.default
        if isinstance(plan, Hang):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), plan.seconds)
            plan = Reply()
        return web.Response(status=plan.status, headers=dict(plan.headers), text=plan.body)
