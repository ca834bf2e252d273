"""Running the gateway: listeners, lifecycle and signals.

Rule: startup and shutdown happen in one order, written down here. Startup: open the outbox and
start the dispatcher, bind the TLS callback listener, then the admin listener. SIGHUP reloads
the configuration (:meth:`Gateway.reload`); requests in flight are not touched. Shutdown
(SIGTERM/SIGINT, or the injected ``shutdown`` awaitable in tests):

1. stop accepting connections on both listeners;
2. let requests in flight finish (each is answered only after its outbox commit), up to
   ``SHUTDOWN_GRACE_S``;
3. stop the dispatcher: no new attempts, attempts in flight finish or stay pending;
4. close the outbox after its queued writes.

Reload (SIGHUP, ``POST /admin/reload``, or a changed certificate file with ``tls.watch_files``):
:meth:`Gateway.reload` reads the configuration file again and builds a new TLS context; only when
both succeed are they swapped in, for new handshakes and new requests, without dropping any
connection. In a gateway of several workers, the primary asks the supervisor to reload the others
(``reload_siblings``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from aiohttp import web

from gateway.config import Config, EventLoop, TlsConfig, load_config
from gateway.delivery.backoff import Breaker
from gateway.delivery.dispatcher import Dispatcher
from gateway.delivery.target_tls import target_contexts
from gateway.edge.listener import Listener
from gateway.edge.tls import (
    SwappableContext,
    build_server_context,
    certificate_expiries,
    stale_crls,
)
from gateway.errors import GatewayError, PortInUse
from gateway.outbox import Outbox
from gateway.runtime.admin import create_admin_app
from gateway.runtime.core import Core
from gateway.runtime.reload import ReloadResult, applicable, restart_only
from gateway.runtime.stats import Snapshot, Stats
from gateway.units import SECONDS

__all__ = [
    "LONE",
    "Gateway",
    "Role",
    "bound_port",
    "check_ports_free",
    "event_loop_runner",
    "listen_error",
    "run",
    "serve_process",
]

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 10 * SECONDS
_FLUSH_EVERY_S = 1 * SECONDS


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


@contextlib.contextmanager
def _binding(port: int, key: str) -> Iterator[None]:
    """Turn "address already in use" while binding ``port`` into :class:`PortInUse`."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise PortInUse(port, key) from exc


def check_ports_free(config: Config) -> None:
    """Raise :class:`PortInUse` now if a configured port is taken, before worker processes
    start (each would otherwise fail on its own). Port 0 is always free."""
    ports = [(config.listen.host, config.listen.port, "listen.port")]
    if config.admin.enabled:
        ports.append((config.admin.host, config.admin.port, "admin.port"))
    for host, port, key in ports:
        if port == 0:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe, _binding(port, key):
            # As asyncio binds a listener: SO_REUSEADDR, so a port in TIME_WAIT counts as free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))


@dataclass(frozen=True, slots=True, kw_only=True)
class Role:
    """How this process takes part in its gateway. The defaults are a lone process; the
    supervisor of several workers gives each of its workers its own (gateway.runtime.workers).

    ``primary``: this process runs the dispatcher and the admin listener. ``wake_channel``: the
    siblings' wake-up channel (gateway.runtime.wake). ``metrics_dir``: the folder the siblings
    count in together (gateway.runtime.stats). ``reload_siblings``: called after a reload asked
    of this process, so that the others follow. ``sock``: accept on this listening socket (the
    supervisor's, shared by its workers) instead of binding ``listen.port``. ``claim``: see
    :class:`~gateway.runtime.core.Core`.
    """

    primary: bool = True
    wake_channel: str | None = None
    metrics_dir: Path | None = None
    reload_siblings: Callable[[], None] | None = None
    sock: socket.socket | None = None
    claim: bool | None = None


LONE = Role()


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
        role: Role = LONE,
    ) -> None:
        self.config = config
        self.primary = role.primary
        self._tls = SwappableContext(
            ssl_context or build_server_context(config.tls, source=config.source)
        )
        self._expiries = certificate_expiries(config.tls)
        self._loaded_at = time.time()
        self._reload_siblings = role.reload_siblings
        self._sock = role.sock
        self.core = Core(
            config,
            primary=role.primary,
            wake_channel=role.wake_channel,
            metrics_dir=role.metrics_dir,
            claim=role.claim,
        )
        self.stats: Stats = self.core.stats
        if config.listen.proxy_protocol:
            self.stats.expect_proxy_headers()
        self._listener: Listener | None = None
        self._admin_runner: web.AppRunner | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.port = 0
        self.admin_port = 0

    @property
    def outbox(self) -> Outbox:
        return self.core.outbox

    @property
    def dispatcher(self) -> Dispatcher | None:
        return self.core.dispatcher

    def wake(self) -> None:
        self.core.wake()

    def breakers(self) -> Mapping[str, Breaker]:
        return self.core.breakers()

    def reload(self) -> ReloadResult:
        """Read the configuration file and the files it names again; swap them in only if all
        of it loads. Never raises: the result says what happened, in one line."""
        result = self._reload()
        if self.primary:
            self.stats.reloaded(result.ok)
        if result.ok:
            log.info("%s", result.message, extra={"action": "reload", "outcome": "success"})
            if self._reload_siblings is not None:
                self._reload_siblings()
        else:
            log.error("%s", result.message, extra={"action": "reload", "outcome": "failure"})
        return result

    def _reload(self) -> ReloadResult:
        source = self.config.source
        if source is None:
            return ReloadResult(False, "reload failed: no configuration file (built in code)")
        try:
            loaded = load_config(source)
            new = applicable(self.config, loaded)
            context = build_server_context(new.tls, source=source)
            expiries = certificate_expiries(new.tls)
            target_tls = target_contexts(new.targets, source=source)
        except (GatewayError, OSError, ValueError) as exc:
            return ReloadResult(False, f"reload failed, nothing changed: {exc}")
        kept = restart_only(self.config, loaded)
        self._tls.swap(context)
        self._expiries = expiries
        self._loaded_at = time.time()
        self.core.reconfigure(new, target_tls)
        self.config = new
        message = f"reloaded {source}"
        if kept:
            message += f"; unchanged until a restart: {', '.join(kept)}"
        return ReloadResult(True, message)

    async def snapshot(self) -> Snapshot:
        """What /metrics reads at scrape time."""
        dispatcher = self.core.dispatcher
        now = time.time()
        server_expiry, ca_expiries = self._expiries
        size = await self.core.outbox.size()
        ordered = [t.name for t in self.config.targets if t.order == "conversation"]
        return Snapshot(
            now=now,
            backlog=await self.core.outbox.backlog(),
            targets=[target.name for target in self.config.targets],
            circuits=dispatcher.circuits(now) if dispatcher is not None else {},
            server_certificate_expiry=server_expiry,
            client_ca_expiries=ca_expiries,
            last_reload_success=self._loaded_at,
            outbox_bytes=size.bytes,
            outbox_rows=size.rows,
            held_back=dict.fromkeys(ordered, 0) | await self.core.outbox.held_back(ordered),
            rate_limited=dispatcher.rate_limited() if dispatcher is not None else {},
        )

    async def _flush_metrics(self) -> None:
        """Answer times are gathered in memory (:meth:`Stats.answered`) and written to the
        metrics every second: the process serving /metrics also flushes before each scrape."""
        while True:
            await asyncio.sleep(_FLUSH_EVERY_S)
            self.stats.flush()

    async def _watch(self) -> None:
        """``tls.watch_files``: reload when a certificate, key, CA or CRL file changes. A
        failed reload is tried again at the next change (a renewal may write the certificate
        and the key one after the other)."""
        loaded = failed = _fingerprint(self.config.tls)
        while True:
            await asyncio.sleep(self.config.tls.watch_interval_s)
            if not self.config.tls.watch_files:
                continue
            now = _fingerprint(self.config.tls)
            if now in (loaded, failed):
                continue
            log.info("certificate files changed; reloading", extra={"action": "reload"})
            if self.reload().ok:
                loaded = _fingerprint(self.config.tls)
            else:
                failed = now

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
            try:
                with _binding(listen.port, "listen.port"):
                    self.port = await self._listener.start(
                        listen.host, listen.port, self._tls.listening, sock=self._sock
                    )
            except PortInUse:
                raise
            except OSError as exc:
                raise listen_error(config, exc) from exc
            self._flusher = asyncio.create_task(self._flush_metrics(), name="metrics flusher")
            if self.primary:
                self._watcher = asyncio.create_task(self._watch(), name="certificate watcher")
            admin = config.admin
            if admin.enabled and self.primary:
                admin_app = create_admin_app(self)
                self._admin_runner = web.AppRunner(admin_app, access_log=None, handle_signals=False)
                await self._admin_runner.setup()
                admin_site = web.TCPSite(self._admin_runner, admin.host, admin.port)
                with _binding(admin.port, "admin.port"):
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
        for task in (self._watcher, self._flusher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._watcher = self._flusher = None
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        if self._listener is not None:
            await self._listener.close(SHUTDOWN_GRACE_S)
            self._listener = None
        await self.core.close()
        self.stats.flush()


async def run(
    config: Config,
    *,
    shutdown: Awaitable[object] | None = None,
    on_ready: Callable[[Gateway], None] | None = None,
    role: Role = LONE,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``shutdown`` completes), then shut down cleanly; reload on
    SIGHUP."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    reload_now: list[Callable[[], object]] = []
    hung_up_early: list[bool] = []  # a SIGHUP before the gateway was up: reload once it is

    def on_hangup() -> None:
        if not reload_now:
            hung_up_early.append(True)
        for reload in reload_now:
            reload()

    handlers = {signal.SIGTERM: stop.set, signal.SIGINT: stop.set, signal.SIGHUP: on_hangup}
    for signum, handler in handlers.items():
        try:
            loop.add_signal_handler(signum, handler)
            installed.append(signum)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
            pass
    try:
        async with Gateway(config, role=role) as gateway:
            reload_now.append(gateway.reload)
            if hung_up_early:
                # The files may have changed after this process read them: read them again.
                gateway.reload()
            log.info(
                "%s listening on https://%s:%d%s (client_auth=%s, loop=%s); admin on %s",
                "primary" if role.primary else "worker",
                config.listen.host,
                gateway.port,
                config.listen.path,
                config.tls.client_auth,
                # The loop it runs on, as found, not as configured: "asyncio" or "uvloop".
                type(loop).__module__.partition(".")[0],
                f"http://{config.admin.host}:{gateway.admin_port}"
                if config.admin.enabled and role.primary
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


def _fingerprint(tls: TlsConfig) -> tuple[tuple[int, int, int] | None, ...]:
    """What changes when a file is rewritten or a symlink is pointed elsewhere (how Kubernetes
    updates a mounted Secret): inode, size and modification time of each file, as followed."""
    files = (tls.cert_file, tls.key_file, tls.client_ca_file, tls.crl_file)
    marks: list[tuple[int, int, int] | None] = []
    for path in files:
        try:
            stat = os.stat(path) if path is not None else None
        except OSError:
            stat = None
        marks.append(None if stat is None else (stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return tuple(marks)


def event_loop_runner(loop: EventLoop = "asyncio") -> asyncio.Runner:
    """A runner on the event loop ``listen.loop`` names, whatever else is installed."""
    if loop == "asyncio":
        return asyncio.Runner()
    import uvloop  # the `speed` extra; the configuration refuses "uvloop" without it

    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def serve_process(
    config: Config, role: Role = LONE, on_ready: Callable[[Gateway], None] | None = None
) -> None:
    """One serving process, on the event loop ``listen.loop`` names."""
    # Until run() handles it, a SIGHUP (an early `systemctl reload`) must not end the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with event_loop_runner(config.listen.loop) as runner:
        runner.run(run(config, role=role, on_ready=on_ready))
