"""The running gateway: its listeners and their lifecycle.

Rule: startup and shutdown happen in one order, written down here. Startup: open the outbox and
start the dispatcher, bind the TLS callback listener, then the admin listener. A reload
(:meth:`Gateway.reload`) leaves requests in flight untouched. Shutdown (at the end of the
``async with`` block; a serving process ends it on SIGTERM/SIGINT, :mod:`gateway.runtime.process`):

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
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gateway.admin.api import start_admin
from gateway.admin.operations import ReloadResult
from gateway.admin.stats import Snapshot, Stats
from gateway.config import Config, TlsConfig, load_config
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
from gateway.runtime.core import Closing, Core
from gateway.runtime.ports import binding, listen_error
from gateway.runtime.reload import applicable, restart_only
from gateway.units import SECONDS

__all__ = ["LONE", "SHUTDOWN_GRACE_S", "Gateway", "Role", "read_snapshot"]

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 10 * SECONDS
_FLUSH_EVERY_S = 1 * SECONDS


@dataclass(frozen=True, slots=True, kw_only=True)
class Role:
    """How this process takes part in its gateway. The defaults are a lone process; the
    supervisor of several workers gives each of its workers its own (gateway.runtime.workers).

    ``primary``: this process runs the dispatcher and the admin listener. ``wake_channel``: the
    siblings' wake-up channel (gateway.runtime.wake). ``metrics_dir``: the folder the siblings
    count in together (gateway.admin.stats). ``reload_siblings``: called after a reload asked
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


class Gateway(Closing):
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

    def replayed(self, delivery_id: str | None) -> None:
        self.core.replayed(delivery_id)

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
        return await read_snapshot(self.core, self._expiries, self._loaded_at)

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
                with binding(listen.port, "listen.port"):
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
            if config.admin.enabled and self.primary:
                self._admin_runner, self.admin_port = await start_admin(self)
        except BaseException:
            await self.close()
            raise
        return self

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


async def read_snapshot(
    core: Core, expiries: tuple[float, Sequence[tuple[str, float]]], loaded_at: float
) -> Snapshot:
    """What /metrics reads at scrape time from ``core`` (its configuration in force, outbox and
    dispatcher), with the certificate ``expiries`` and the time the configuration was
    ``loaded_at``. The one reading for both admin listeners, the gateway's own and the one of a
    core embedded in an application (:func:`gateway.runtime.app.create_app`), so that their
    series cannot drift apart."""
    dispatcher = core.dispatcher
    targets = core.config.targets
    now = time.time()
    server_expiry, ca_expiries = expiries
    size = await core.outbox.size()
    ordered = [t.name for t in targets if t.order == "conversation"]
    return Snapshot(
        now=now,
        backlog=await core.outbox.backlog(),
        targets=[target.name for target in targets],
        circuits=dispatcher.circuits(now) if dispatcher is not None else {},
        server_certificate_expiry=server_expiry,
        client_ca_expiries=ca_expiries,
        last_reload_success=loaded_at,
        outbox_bytes=size.bytes,
        outbox_rows=size.rows,
        held_back=dict.fromkeys(ordered, 0) | await core.outbox.held_back(ordered),
        rate_limited=dispatcher.rate_limited() if dispatcher is not None else {},
    )


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
