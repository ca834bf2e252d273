"""The core every front door attaches to: outbox, dispatcher, callback and stats, wired once.

Rule: a front door (the gateway's own TLS listener, the admin app, an aiohttp application that
embeds the callback) never builds these parts itself; it starts a :class:`Core`, hands requests
to ``core.callback`` and closes the core after it has stopped taking requests.

With a shared (PostgreSQL) outbox, the dispatching process takes the lease on what it accepts
and the outbox wakes its dispatcher when another gateway announces deliveries.

Startup order: claim the outbox (a dispatching process that no supervisor claims it for), open
it, start the dispatcher (primary process only) and the wake-up
channel between sibling workers, then build the callback. Shutdown runs it backwards: close the
wake-up channel, stop the dispatcher (attempts in flight finish or stay pending), close the
outbox after its queued writes, release the claim.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from gateway.admin.stats import Stats
from gateway.config import Config
from gateway.delivery.backoff import Breaker
from gateway.delivery.dispatcher import Dispatcher
from gateway.delivery.target_tls import target_contexts
from gateway.edge.callback import Callback, StoredHook
from gateway.outbox import Delivery, Outbox, OutboxHold, hold_outbox, open_outbox
from gateway.runtime.wake import Bell, Doorbell

if TYPE_CHECKING:
    from gateway.tracing.export import Exporting

__all__ = ["Closing", "Core"]

log = logging.getLogger(__name__)


class Closing:
    """A part used as ``async with part``: the block's end closes it (:meth:`close`), however
    the block ended."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class Core(Closing):
    """``async with Core(config) as core``: the shared parts, running until the block ends.

    Only the ``primary`` process of a multi-worker gateway runs the dispatcher, so exactly one
    process forwards; with a ``wake_channel`` the others ring it when they store something
    (:mod:`gateway.runtime.wake`). ``metrics_dir``: sibling workers count together
    (:mod:`gateway.admin.stats`). ``claim``: hold the outbox for this gateway alone (by
    default when ``primary``; the workers of a supervisor leave it to the supervisor).
    """

    def __init__(
        self,
        config: Config,
        *,
        primary: bool = True,
        wake_channel: str | None = None,
        metrics_dir: Path | None = None,
        claim: bool | None = None,
    ) -> None:
        self.config = config
        self.primary = primary
        self._claim = primary if claim is None else claim
        self._hold: OutboxHold | None = None
        self._wake_channel = wake_channel
        self.stats = Stats(metrics_dir)
        self.stats.prime(target.name for target in config.targets)
        self._outbox: Outbox | None = None
        self._callback: Callback | None = None
        self.dispatcher: Dispatcher | None = None
        self._doorbell: Doorbell | None = None
        self._bell: Bell | None = None
        self._checks: set[asyncio.Task[None]] = set()
        # The span exporter, only with [tracing] enabled: off, nothing is imported or started.
        self._exporting: Exporting | None = None

    @property
    def outbox(self) -> Outbox:
        assert self._outbox is not None, "the core is not started"
        return self._outbox

    @property
    def callback(self) -> Callback:
        assert self._callback is not None, "the core is not started"
        return self._callback

    def wake(self) -> None:
        """Have the dispatcher look for due deliveries now (after a replay, for example)."""
        if self.dispatcher is not None:
            self.dispatcher.wake()

    def replayed(self, delivery_id: str | None) -> None:
        """An operator replayed ``delivery_id`` (``None``: pending deliveries, any of them):
        the dispatcher lets go of what it holds of them in memory, then looks."""
        if self.dispatcher is not None:
            self.dispatcher.replayed(delivery_id)

    def breakers(self) -> dict[str, Breaker]:
        """Each target's circuit breaker (empty where this process runs no dispatcher)."""
        return {} if self.dispatcher is None else self.dispatcher.breakers()

    def reconfigure(
        self, config: Config, target_tls: Mapping[str, ssl.SSLContext] | None = None
    ) -> None:
        """Take a reloaded configuration (see :mod:`gateway.runtime.reload` for what applies),
        with its targets' TLS contexts (built here when not given: raises CertificateError)."""
        if target_tls is None:
            target_tls = target_contexts(config.targets, source=config.source)
        self.config = config
        self.stats.prime(target.name for target in config.targets)
        if self._callback is not None:
            self._callback.reconfigure(config)
        if self.dispatcher is not None:
            self.dispatcher.reconfigure(config.targets, config.dispatcher, target_tls)
            self._check_unconfigured()

    def _check_unconfigured(self) -> None:
        task = asyncio.create_task(self._warn_unconfigured())
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _warn_unconfigured(self) -> None:
        """Say so when deliveries wait for a target the configuration no longer names: they
        stay pending (listed, replayable) rather than being dropped or dead-lettered."""
        try:
            backlog = await self.outbox.backlog()
        except Exception:
            log.exception("could not read the outbox's backlog")
            return
        names = {target.name for target in self.config.targets}
        for each in backlog:
            if each.target not in names and each.pending:
                log.warning(
                    "%d deliveries pending for target %s, which is not configured: they stay"
                    " in the outbox until it is configured again or they are purged",
                    each.pending,
                    each.target,
                    extra={"target": each.target, "pending": each.pending},
                )

    async def start(self) -> None:
        config = self.config
        try:
            if config.tracing.enabled:
                from gateway.tracing.export import Exporting  # the otel extra: only when asked

                self._exporting = Exporting(config.tracing)
            tracing = None if self._exporting is None else self._exporting.tracing
            if self._claim:
                self._hold = hold_outbox(config.outbox)
            # A shared (PostgreSQL) outbox wakes the dispatcher when another gateway announces
            # deliveries; only the dispatching process takes leases on what it accepts.
            self._outbox = await open_outbox(
                config.outbox,
                on_commit=self.stats.committed,
                dispatching=self.primary,
                on_wake=self.wake if self.primary else None,
                # Replays made elsewhere (another gateway, the command line) reach the runs
                # the dispatcher holds in memory as this process's own do.
                on_replay=self.replayed if self.primary else None,
            )
            on_stored: StoredHook | None = None
            if self.primary:
                # Every target's CA and client certificate read now: a bad file stops the start.
                target_tls = target_contexts(config.targets, source=config.source)
                self.dispatcher = Dispatcher(
                    self._outbox,
                    config.targets,
                    config.dispatcher,
                    retention_s=config.outbox.retention_s,
                    dead_retention_s=config.outbox.dead_retention_s,
                    observer=self.stats,
                    tls=target_tls,
                    tracing=tracing,
                )
                self.dispatcher.start()
                self._check_unconfigured()
                on_stored = self.dispatcher.offer
                if self._wake_channel is not None:
                    self._doorbell = Doorbell(self._wake_channel, self.dispatcher.wake)
            elif self._wake_channel is not None:
                bell = self._bell = Bell(self._wake_channel)

                def ring(_: Sequence[Delivery]) -> None:
                    bell.ring()

                on_stored = ring
            self._callback = Callback(config, self._outbox, self.stats, on_stored=on_stored)
            self._callback.tracing = tracing
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """The shutdown order of the module docstring, each part only if it was started."""
        self._callback = None
        for check in list(self._checks):
            check.cancel()
        await asyncio.gather(*self._checks, return_exceptions=True)
        if self._doorbell is not None:
            self._doorbell.close()
            self._doorbell = None
        if self._bell is not None:
            self._bell.close()
            self._bell = None
        if self.dispatcher is not None:
            await self.dispatcher.stop()
            self.dispatcher = None
        if self._outbox is not None:
            await self._outbox.close()
            self._outbox = None
        if self._hold is not None:
            self._hold.release()
            self._hold = None
        if self._exporting is not None:  # last: the spans of the attempts just finished go too
            await self._exporting.close()
            self._exporting = None

    async def __aenter__(self) -> Core:
        await self.start()
        return self
