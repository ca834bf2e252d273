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
both succeed, from files that did not change meanwhile, are they swapped in, for new handshakes
and new requests, without dropping any connection. In a gateway of several workers, the primary
(worker 0) alone reads the files of its own accord: it writes down what it took and asks the
supervisor to have the others follow (``reload_siblings``); each takes the very same files or
refuses them (:mod:`gateway.runtime.reload`). When one refuses because the files changed after
worker 0 read them, worker 0 reads them again, so that all end with the same. The admin API's
reload waits for the others' answers (:data:`WORKERS_CONFIRM_S` at most) and says what the whole
gateway did; SIGHUP and the watcher do not hold worker 0's event loop for it, and log the outcome
when it is known.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Generator, Mapping, Sequence
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
from gateway.runtime.reload import (
    UNREADABLE,
    Answer,
    Asked,
    Files,
    answer,
    answers,
    applicable,
    ask,
    asked,
    first_difference,
    named_files,
    read_files,
    restart_only,
)
from gateway.tlsfiles import at
from gateway.units import SECONDS

__all__ = [
    "LONE",
    "SHUTDOWN_GRACE_S",
    "WORKERS_CONFIRM_S",
    "Gateway",
    "Role",
    "read_snapshot",
]

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 10 * SECONDS
_FLUSH_EVERY_S = 1 * SECONDS
# How long worker 0 waits for the other workers to answer a reload: each takes a few
# milliseconds once the supervisor passes the request on; a worker that has not answered by
# then is named in the outcome (it follows when it can).
WORKERS_CONFIRM_S = 5 * SECONDS
_LOOK_EVERY_S = 0.01 * SECONDS
# Rounds of asking the other workers: a second when one of them read other content than worker
# 0 had (the files changed in between), so worker 0 reads them again. Files that keep changing
# past that are reported, not chased.
_ROUNDS = 2


@dataclass(frozen=True, slots=True)
class _Reloaded:
    """One process's reload: its ``result``; the ``files`` it took (empty when it failed);
    ``changed``: it refused files other than the ones worker 0 took."""

    result: ReloadResult
    files: Files = ()
    changed: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Role:
    """How this process takes part in its gateway. The defaults are a lone process; the
    supervisor of several workers gives each of its workers its own (gateway.runtime.workers).

    ``primary``: this process runs the dispatcher and the admin listener. ``wake_channel``: the
    siblings' wake-up channel (gateway.runtime.wake). ``metrics_dir``: the folder the siblings
    count in together (gateway.admin.stats), and where they write down what a reload took
    (gateway.runtime.reload). ``reload_siblings``: called after a reload asked of this process,
    so that the others follow. ``sock``: accept on this listening socket (the supervisor's,
    shared by its workers) instead of binding ``listen.port``. ``claim``: see
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
        # Before the context is built from them: a change meanwhile is one the watcher sees.
        self._watched = _fingerprint(config.tls)
        self._tls = SwappableContext(
            ssl_context or build_server_context(config.tls, source=config.source)
        )
        self._trust = _trust(config.tls)
        self._expiries = certificate_expiries(config.tls)
        self._loaded_at = time.time()
        self._reload_siblings = role.reload_siblings
        # Where the workers write down what a reload took: worker 0 leads there when it has
        # others to ask, every other worker follows it.
        self._shared = role.metrics_dir
        self._leads = (
            role.primary and role.reload_siblings is not None and role.metrics_dir is not None
        )
        self._follows = not role.primary and role.metrics_dir is not None
        self._followed: str | None = None
        self._follow_up: asyncio.Task[None] | None = None
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
        of it loads. Never raises: the result says what happened, in one line: this process's
        own reload. In worker 0 of several, the others' answers are gathered by a task of its
        own, which logs the outcome when one has not taken the files: what SIGHUP and the
        certificate watcher ask."""
        own = self._reload_own()
        if isinstance(own, ReloadResult):
            return own
        self._follow_up = asyncio.create_task(
            self._drive(self._rounds(own)), name="reload of the workers"
        )
        return own.result

    async def reload_confirmed(self) -> ReloadResult:
        """:meth:`reload`, and in worker 0 of several, the outcome for the whole gateway once
        every worker has answered (:data:`WORKERS_CONFIRM_S` at most each time it asks them),
        awaited: the event loop goes on serving meanwhile. What the admin API answers."""
        own = self._reload_own()
        if isinstance(own, ReloadResult):
            return own
        rounds = self._rounds(own)
        try:
            ask_id = next(rounds)
            while True:
                ask_id = rounds.send(await self._gather(ask_id))
        except StopIteration as done:
            outcome: ReloadResult = done.value
            return outcome

    def _reload_own(self) -> ReloadResult | _Reloaded:
        """This process's part of a reload: its result when that is all there is to it (a
        follower, a failure, or no other worker to ask), else what worker 0 took, for the
        others to follow."""
        if self._follows:
            return self._follow()
        own = self._reload_logged()
        if not own.result.ok or not self._leads or self.config.listen.workers < 2:
            if self.primary:
                self.stats.reloaded(own.result.ok)
            return own.result
        # A newer reload replaces one whose answers are still awaited.
        if self._follow_up is not None:
            self._follow_up.cancel()
            self._follow_up = None
        return own

    def _reload_logged(self, expected: Asked | None = None) -> _Reloaded:
        reloaded = self._reload(expected)
        extra = {"action": "reload", "outcome": "success" if reloaded.result.ok else "failure"}
        if reloaded.result.ok:
            log.info("%s", reloaded.result.message, extra=extra)
        elif reloaded.changed:  # worker 0 reads them again: a step, not yet a failure
            log.warning("%s", reloaded.result.message, extra=extra)
        else:
            log.error("%s", reloaded.result.message, extra=extra)
        return reloaded

    def _reload(self, expected: Asked | None = None) -> _Reloaded:
        """This process's own reload; with ``expected``, only of exactly the files worker 0
        took."""
        source = self.config.source
        if source is None:
            return _Reloaded(
                ReloadResult(False, "reload failed: no configuration file (built in code)")
            )
        kept: list[str] = []
        try:
            # Read before the load and compared after it, with every file it names read
            # before and after the build: a file written meanwhile (an editor saving in
            # place, a renewal half done) is refused rather than half taken.
            first = read_files([source])
            loaded = load_config(source)
            kept = restart_only(self.config, loaded)
            new = applicable(self.config, loaded)
            paths = named_files(source, new)
            before = read_files(paths)
            context = build_server_context(new.tls, source=source)
            expiries = certificate_expiries(new.tls)
            target_tls = target_contexts(new.targets, source=source)
            after = read_files(paths)
        except (GatewayError, OSError, ValueError) as exc:
            message = f"reload failed, nothing changed: {exc}"
            if kept:
                # The reason may follow from a key the file changes that the reload keeps
                # as it was (tls.client_auth = "off" with no client CA: the CA is needed
                # while client_auth stays "required"): named, or the file seems to say
                # otherwise than the reason.
                message += f" (unchanged until a restart, so as before: {', '.join(kept)})"
            return _Reloaded(ReloadResult(False, message))
        changed = first_difference(first, before[:1]) or first_difference(before, after)
        if changed is not None:
            return _Reloaded(
                ReloadResult(
                    False,
                    f"reload failed, nothing changed: {changed}: changed while it was read"
                    " (still being written?); reload again once it is complete",
                )
            )
        if expected is not None:
            differs = first_difference(expected.files, after)
            if differs is not None:
                return _Reloaded(
                    ReloadResult(
                        False,
                        f"reload failed, nothing changed: {differs}: changed after worker 0"
                        " read it",
                    ),
                    changed=True,
                )
        self._tls.swap(context)
        trust = _trust(new.tls)
        if trust != self._trust:
            # The connections open now were accepted under the trust just replaced: they go,
            # once they have answered, so that no client keeps a certificate the new trust
            # refuses (a root taken out, a revocation) on a keep-alive connection.
            self._trust = trust
            if self._listener is not None:
                self._listener.retire_connections()
        self._expiries = expiries
        self._loaded_at = time.time()
        self.core.reconfigure(new, target_tls)
        self.config = new
        message = f"reloaded {source}"
        if kept:
            message += f"; unchanged until a restart: {', '.join(kept)}"
        return _Reloaded(ReloadResult(True, message), after)

    def _follow(self) -> ReloadResult:
        """A worker other than worker 0: take the files worker 0 last took, if not yet done,
        and write down the answer. A SIGHUP with nothing new from worker 0 (the supervisor
        passes one on to every worker, and worker 0 asks again once it has reloaded) does
        nothing."""
        assert self._shared is not None
        request = asked(self._shared)
        if request is None or request.ask_id == self._followed:
            return ReloadResult(True, "nothing to reload: worker 0 has asked for nothing new")
        self._followed = request.ask_id
        reloaded = self._reload_logged(request)
        result = reloaded.result
        answer(
            self._shared,
            os.getpid(),
            Answer(request.ask_id, result.ok, reloaded.changed, result.message),
        )
        return result

    def _rounds(self, own: _Reloaded) -> Generator[str, dict[int, Answer], ReloadResult]:
        """Worker 0 asks the others to take what it took: yields each request's id, is sent
        the answers gathered for it, and returns the whole gateway's outcome (logged when not
        every worker took it, and counted once)."""
        assert self._shared is not None
        assert self._reload_siblings is not None
        others = self.config.listen.workers - 1
        source = self.config.source
        result = own.result
        for round_ in range(_ROUNDS):
            request = Asked(secrets.token_hex(8), own.files)
            try:
                ask(self._shared, request)
                self._reload_siblings()
            except OSError as exc:  # the shared folder gone, or the supervisor: stopping
                result = ReloadResult(
                    False,
                    f"reloaded {source} in worker 0, but could not ask the other workers:"
                    f" {exc.strerror or exc}",
                )
                break
            replies = yield request.ask_id
            refused = {pid: reply for pid, reply in replies.items() if not reply.ok}
            if len(replies) >= others and not refused:
                result = own.result
                break
            changed = [reply for reply in refused.values() if reply.changed]
            if changed and len(replies) >= others and round_ + 1 < _ROUNDS:
                log.info(
                    "the files changed after worker 0 read them and before another worker"
                    " did: worker 0 reads them again",
                    extra={"action": "reload"},
                )
                own = self._reload_logged()
                if not own.result.ok:
                    result = ReloadResult(
                        False,
                        f"reloaded {source} in worker 0 alone: the files changed before the"
                        f" other workers read them, and now: {own.result.message}",
                    )
                    break
                continue
            result = _partly(own.result, source, others, replies)
            break
        self.stats.reloaded(result.ok)
        if not result.ok:
            log.error("%s", result.message, extra={"action": "reload", "outcome": "failure"})
        return result

    async def _gather(self, ask_id: str) -> dict[int, Answer]:
        assert self._shared is not None
        deadline = time.monotonic() + WORKERS_CONFIRM_S
        while True:
            found = answers(self._shared, ask_id)
            if len(found) >= self.config.listen.workers - 1 or time.monotonic() > deadline:
                return found
            await asyncio.sleep(_LOOK_EVERY_S)

    async def _drive(self, rounds: Generator[str, dict[int, Answer], ReloadResult]) -> None:
        """Run worker 0's rounds to their outcome (which they log), waiting in a task."""
        with contextlib.suppress(StopIteration):
            ask_id = next(rounds)
            while True:
                ask_id = rounds.send(await self._gather(ask_id))

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
        """``tls.watch_files``: reload when a certificate, key, CA or CRL file changes, once
        its content has stayed the same for a whole ``watch_interval_s``: a renewal may write
        a file a piece at a time, or the certificate and the key one after the other (certbot
        points one link, then the next). A file that cannot be read (a link made again, a
        file being replaced) is waited for, said once, instead of failing a reload; the
        files loaded before are served meanwhile. A failed reload is tried again at the next
        change."""
        loaded = failed = seen = self._watched
        waiting: set[str] = set()
        while True:
            await asyncio.sleep(self.config.tls.watch_interval_s)
            tls = self.config.tls
            if not tls.watch_files:
                continue
            now = _fingerprint(tls)
            if now != seen:  # changing: look again an interval later
                seen = now
                continue
            gone = {
                key: path
                for key, path, mark in zip(_WATCHED, _watched_files(tls), now, strict=True)
                if path is not None and mark == UNREADABLE
            }
            for key in gone.keys() - waiting:
                log.warning(
                    "%s: cannot be read; serving the files loaded before until it can",
                    at(key, gone[key]),
                    extra={"action": "reload"},
                )
            waiting = set(gone)
            if gone or now in (loaded, failed):
                continue
            log.info("certificate files changed; reloading", extra={"action": "reload"})
            if self.reload().ok:
                loaded = now
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
        for task in (self._watcher, self._follow_up, self._flusher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._watcher = self._follow_up = self._flusher = None
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


_WATCHED = ("tls.cert_file", "tls.key_file", "tls.client_ca_file", "tls.crl_file")


def _watched_files(tls: TlsConfig) -> tuple[Path | None, ...]:
    return (tls.cert_file, tls.key_file, tls.client_ca_file, tls.crl_file)


def _trust(tls: TlsConfig) -> tuple[Files, tuple[str, ...], tuple[str, ...]]:
    """What decides whether a client certificate is taken: the client CA bundle and the CRL as
    read now (:func:`~gateway.runtime.reload.read_files`), the accepted CNs and the pinned CA
    fingerprints."""
    files = read_files([path for path in (tls.client_ca_file, tls.crl_file) if path is not None])
    return files, tuple(tls.client_cn), tuple(tls.meta_ca_sha256)


def _fingerprint(tls: TlsConfig) -> tuple[str, ...]:
    """What the watcher compares: each file's SHA-256 as :func:`~gateway.runtime.reload.read_files`
    reads it, through any links, so a file written in place, renamed over or reached through a
    link pointed elsewhere (how Kubernetes updates a mounted Secret) is a change whatever its
    size and times; UNREADABLE for one that cannot be read, "" for one not configured. A few
    kilobytes read per interval."""
    return tuple("" if path is None else read_files([path])[0][1] for path in _watched_files(tls))


def _partly(
    own: ReloadResult, source: Path | None, others: int, replies: Mapping[int, Answer]
) -> ReloadResult:
    """The outcome when worker 0 reloaded and not every other worker did: one line naming
    each worker that refused (by pid) and how many have not answered."""
    parts = [
        f"worker {pid} kept its configuration ({reply.message})"
        for pid, reply in sorted(replies.items())
        if not reply.ok
    ]
    silent = others - len(replies)
    if silent > 0:
        parts.append(
            f"{silent} other worker{' has' if silent == 1 else 's have'} not confirmed it within"
            f" {WORKERS_CONFIRM_S:g} s (it takes the same files when it does, if they have not"
            " changed)"
        )
    kept = own.message.partition("; ")[2]
    head = f"reloaded {source} in worker 0" + (f" ({kept})" if kept else "")
    again = "; reload again" if len(parts) > (silent > 0) else ""
    return ReloadResult(False, f"{head}, but {'; '.join(parts)}{again}")
