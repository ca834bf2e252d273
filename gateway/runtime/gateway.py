"""Running the gateway: listeners, lifecycle and signals.

Rule: startup and shutdown happen in one order, written down here. Startup: open the outbox and
start the dispatcher, bind the TLS callback listener, then the admin listener. Shutdown
(SIGTERM/SIGINT, or the injected ``shutdown`` awaitable in tests):

1. stop accepting connections on both listeners;
2. let requests in flight finish (each is answered only after its outbox commit), up to
   ``SHUTDOWN_GRACE_S``;
3. stop the dispatcher: no new attempts, attempts in flight finish or stay pending;
4. close the outbox after its queued writes.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import logging
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType

from aiohttp import web

from gateway.config import Config
from gateway.delivery.dispatcher import Dispatcher
from gateway.edge.listener import Listener
from gateway.edge.tls import build_server_context, stale_crls
from gateway.errors import GatewayError
from gateway.outbox import Outbox
from gateway.runtime.admin import create_admin_app
from gateway.runtime.core import Core
from gateway.units import SECONDS

__all__ = [
    "Gateway",
    "bound_port",
    "event_loop_runner",
    "listen_error",
    "run",
    "serve_process",
]

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 10 * SECONDS


def listen_error(config: Config, exc: OSError) -> GatewayError:
    """The one-line error for a listening socket the system refused (a port in use above all,
    where Python would print a traceback)."""
    listen = config.listen
    where = f"listen.port {listen.port} in {config.source or 'the configuration'}"
    if exc.errno == errno.EADDRINUSE:
        return GatewayError(
            f"{where} is in use by another process (another gateway?); stop it or choose"
            " another port"
        )
    return GatewayError(f"{where}: cannot listen on {listen.host}: {exc.strerror or exc}")


def bound_port(site: web.TCPSite) -> int:
    """The port ``site`` listens on (useful after binding port 0)."""
    server = site._server  # aiohttp exposes no public accessor for the bound socket
    sockets = getattr(server, "sockets", None)
    assert sockets, "site is not started"
    return int(sockets[0].getsockname()[1])


class Gateway:
    """The running gateway: ``async with Gateway(config) as gw`` listens until the block ends.

    A :class:`~gateway.runtime.core.Core` with two front doors: the TLS callback listener and,
    in the primary process, the admin listener. ``gw.port`` and ``gw.admin_port`` are the bound
    ports (useful with port 0 in tests).
    """

    def __init__(
        self,
        config: Config,
        *,
        ssl_context: ssl.SSLContext | None = None,
        primary: bool = True,
        reuse_port: bool = False,
        wake_channel: str | None = None,
        metrics_dir: Path | None = None,
        sock: socket.socket | None = None,
        claim: bool | None = None,
    ) -> None:
        """``sock``: accept on this listening socket (a supervisor's, shared by its workers)
        instead of binding ``listen.port``; ``claim``: see :class:`Core`."""
        self.config = config
        self.primary = primary
        self._reuse_port = reuse_port
        self._sock = sock
        self._ssl = ssl_context or build_server_context(config.tls)
        self.core = Core(
            config,
            primary=primary,
            wake_channel=wake_channel,
            metrics_dir=metrics_dir,
            claim=claim,
        )
        self.stats = self.core.stats
        self._listener: Listener | None = None
        self._admin_runner: web.AppRunner | None = None
        self.port = 0
        self.admin_port = 0

    @property
    def outbox(self) -> Outbox:
        return self.core.outbox

    @property
    def dispatcher(self) -> Dispatcher | None:
        return self.core.dispatcher

    async def __aenter__(self) -> Gateway:
        config = self.config
        if config.tls.crl_file is not None:
            now = datetime.datetime.now(datetime.UTC)
            for stale in stale_crls(config.tls.crl_file, now):
                log.warning("%s", stale)
        try:
            await self.core.start()
            listen = config.listen
            self._listener = Listener(self.core.callback, listen)
            # SO_REUSEPORT only for sibling workers: it lets any process of the same user share
            # the port (and its connections), so a lone gateway never sets it.
            try:
                self.port = await self._listener.start(
                    listen.host,
                    listen.port,
                    self._ssl,
                    reuse_port=self._reuse_port,
                    sock=self._sock,
                )
            except OSError as exc:
                raise listen_error(config, exc) from exc
            admin = config.admin
            if admin.enabled and self.primary:
                admin_app = create_admin_app(
                    config, self.core.outbox, self.stats, wake=self.core.wake
                )
                self._admin_runner = web.AppRunner(admin_app, access_log=None, handle_signals=False)
                await self._admin_runner.setup()
                admin_site = web.TCPSite(self._admin_runner, admin.host, admin.port)
                await admin_site.start()
                self.admin_port = bound_port(admin_site)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Steps 1 to 4 of the module docstring, each part only if it was started."""
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        if self._listener is not None:
            await self._listener.close(SHUTDOWN_GRACE_S)
            self._listener = None
        await self.core.close()


async def run(
    config: Config,
    *,
    shutdown: Awaitable[object] | None = None,
    on_ready: Callable[[Gateway], None] | None = None,
    primary: bool = True,
    reuse_port: bool = False,
    wake_channel: str | None = None,
    metrics_dir: Path | None = None,
    sock: socket.socket | None = None,
    claim: bool | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``shutdown`` completes), then shut down cleanly."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop.set)
            installed.append(signum)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
            pass
    try:
        async with Gateway(
            config,
            primary=primary,
            reuse_port=reuse_port,
            wake_channel=wake_channel,
            metrics_dir=metrics_dir,
            sock=sock,
            claim=claim,
        ) as gateway:
            log.info(
                "%s listening on https://%s:%d%s (client_auth=%s); admin on %s",
                "primary" if primary else "worker",
                config.listen.host,
                gateway.port,
                config.listen.path,
                config.tls.client_auth,
                f"http://{config.admin.host}:{gateway.admin_port}"
                if config.admin.enabled and primary
                else "off",
            )
            if on_ready is not None:
                on_ready(gateway)
            waiters: list[asyncio.Future[object]] = [asyncio.ensure_future(stop.wait())]
            if shutdown is not None:
                waiters.append(asyncio.ensure_future(shutdown))
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            log.info("shutting down")
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


def event_loop_runner() -> asyncio.Runner:
    try:
        import uvloop  # optional: a faster event loop when installed (pip install .[speed])
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def serve_process(
    config: Config,
    *,
    primary: bool,
    reuse_port: bool,
    wake_channel: str | None = None,
    metrics_dir: Path | None = None,
    sock: socket.socket | None = None,
    claim: bool | None = None,
) -> None:
    """One serving process, on uvloop when it is installed."""
    with event_loop_runner() as runner:
        runner.run(
            run(
                config,
                primary=primary,
                reuse_port=reuse_port,
                wake_channel=wake_channel,
                metrics_dir=metrics_dir,
                sock=sock,
                claim=claim,
            )
        )
