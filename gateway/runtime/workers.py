"""``[listen] workers = N``: N acceptor processes on one port, exactly one dispatcher.

Rule: the supervisor (the process ``serve`` started) forwards nothing; it claims the outbox for its
gateway (:func:`gateway.outbox.hold_outbox`: a second gateway on the same file is refused), binds
the listening socket once and starts N worker processes that all accept on it, so whichever worker
is free takes the next connection. The socket is not SO_REUSEPORT: that option would let any other
process of the same user bind the port too and take a share of the connections, so a second gateway
on the port fails to start instead. Worker 0 is the primary: it alone runs the dispatcher and the
admin listener; the others tell it when they have stored something (:mod:`gateway.runtime.wake`).
All share the SQLite outbox (WAL lets them write one after another and read at once), and all count
into one metrics folder the supervisor makes and removes, so worker 0's ``/metrics`` is the whole
gateway's (:mod:`gateway.admin.stats`).

Signals: SIGTERM/SIGINT to the supervisor are passed to every worker, which shut down as a single
process would; the supervisor waits for them and exits 0. SIGHUP and SIGINT are ignored while the
workers start (SIGHUP would end one half-started, SIGINT raise a traceback from its imports: a
Ctrl-C reaches the whole process group, and the supervisor stops them). Workers ask the kernel to
send them SIGTERM if the supervisor dies (PR_SET_PDEATHSIG), so none is left behind even after a
SIGKILL. Each worker tells the supervisor, over a pipe of its own, once it serves, or the one-line
reason it cannot (an unreachable database, an outbox it cannot write): the supervisor then stops the
others and raises that reason, so `serve` says it and exits 2 as a lone gateway would; it logs
"started N workers" only once all serve. If a worker dies on its own later, the supervisor stops the
others and exits 1: a half-running gateway is worse than a restart by the service manager. SIGHUP to
the supervisor is passed to every worker: worker 0 reloads
(:meth:`gateway.runtime.gateway.Gateway.reload`) and asks the others, through the supervisor
(SIGUSR1 from worker 0: "reload the others"), to take exactly the files it took; a reload asked of
worker 0 through the admin API or its file watcher goes the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from gateway.admin.stats import MULTIPROCESS_ENV
from gateway.config import Config
from gateway.edge.acceptor import bind
from gateway.errors import GatewayError
from gateway.outbox import hold_outbox
from gateway.runtime.gateway import Role
from gateway.runtime.logs import setup_logging
from gateway.runtime.ports import listen_error
from gateway.runtime.process import serve_process
from gateway.runtime.wake import channel_name

__all__ = ["stale_metrics_dirs", "supervise"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# A worker that cannot start exits with this after telling the supervisor why; the supervisor
# then gives the reason as one line, and the command line exits 2 as for a lone gateway.
EXIT_STARTUP = 2
_STOP_GRACE_S = 30.0
_RELOAD_OTHERS = signal.SIGUSR1

_METRICS_PREFIX = "waba-gateway-metrics-"


def stale_metrics_dirs(names: Iterable[str], alive: Callable[[int], bool]) -> list[str]:
    """Of the folder ``names`` in the temporary folder, the metrics folders of supervisors that
    are no longer alive (a supervisor killed with SIGKILL cannot remove its own)."""
    stale = []
    for name in names:
        if not name.startswith(_METRICS_PREFIX):
            continue
        pid, _, rest = name[len(_METRICS_PREFIX) :].partition("-")
        if rest and pid.isascii() and pid.isdigit() and not alive(int(pid)):
            stale.append(name)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def _remove_stale_metrics_dirs(folder: Path) -> None:
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in stale_metrics_dirs(names, _alive):
        shutil.rmtree(folder / name, ignore_errors=True)
        log.info("removed %s, left behind by a gateway that is gone", folder / name)


def _die_with_parent(supervisor: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    # The signal only covers a death from now on: a supervisor killed while this process was
    # starting has already left it to init, and it must not go on serving the shared socket.
    if os.getppid() != supervisor:
        raise SystemExit(1)


def _ask_supervisor_to_reload_the_others(supervisor: int) -> None:
    # Only while the supervisor is still this worker's parent: once it is gone, the parent is
    # init (or a container's first process, or a subreaper), to which SIGUSR1 means something
    # else or ends it; this worker is then on its way out anyway (PR_SET_PDEATHSIG).
    if os.getppid() == supervisor:
        os.kill(supervisor, _RELOAD_OTHERS)


def _worker(
    config: Config,
    index: int,
    wake_channel: str,
    metrics_dir: Path,
    sock: socket.socket,
    supervisor: int,
    report: Connection,
) -> None:
    """One worker: ``report`` hears ``None`` once it serves, or the one-line reason it cannot
    start (the supervisor says it, as a lone gateway would, instead of a worker's traceback)."""
    # Spawned with SIGHUP and SIGINT blocked and ignored (see _supervise): take them again,
    # still ignored until the gateway's handlers are in place. A Ctrl-C meanwhile is the
    # supervisor's to act on (it reaches the whole process group): here it would be a
    # KeyboardInterrupt's traceback from the middle of an import.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP, signal.SIGINT})
    _die_with_parent(supervisor)
    setup_logging(config.log_level, config.log_format)
    role = Role(
        primary=index == 0,
        wake_channel=wake_channel,
        metrics_dir=metrics_dir,
        reload_siblings=(
            functools.partial(_ask_supervisor_to_reload_the_others, supervisor)
            if index == 0
            else None
        ),
        sock=sock,
        claim=False,  # the supervisor holds the outbox for all its workers
    )
    serving: list[bool] = []

    def ready(_gateway: object) -> None:
        serving.append(True)
        with contextlib.suppress(OSError):  # a supervisor gone stops this worker anyway
            report.send(None)

    try:
        serve_process(config, role, on_ready=ready)
    except GatewayError as exc:
        if serving:  # the supervisor no longer listens: the log says why this worker ends
            log.error("%s", exc)
        else:
            with contextlib.suppress(OSError):  # the supervisor may be gone
                report.send(str(exc))
        raise SystemExit(EXIT_STARTUP) from None


def _bind(config: Config) -> socket.socket:
    """The listening socket every worker accepts on, bound as a lone gateway binds its own."""
    try:
        return bind(config.listen.host, config.listen.port)
    except OSError as exc:
        raise listen_error(config, exc) from exc


def _started(
    workers: list[BaseProcess], reports: list[Connection], stopping: threading.Event
) -> bool:
    """Wait until every worker serves (True) or a signal asks to stop (False); raise the
    :class:`GatewayError` a worker could not start with, or one saying which worker died."""
    waiting = dict(zip(reports, workers, strict=True))
    while waiting:
        if stopping.is_set():
            return False
        for report in wait(list(waiting), timeout=0.5):
            assert isinstance(report, Connection)
            process = waiting.pop(report)
            try:
                reason = report.recv()
            except EOFError:  # it died before it could say anything
                if stopping.is_set():
                    # The stop signal reached it too, before its handler was in place (Ctrl-C
                    # signals the terminal's whole process group, systemd's stop every process
                    # of the service): a stop asked for, not a worker that could not start.
                    return False
                process.join(_STOP_GRACE_S)
                raise GatewayError(
                    f"worker {process.name} exited while starting (exit code"
                    f" {process.exitcode}); see the log above"
                ) from None
            if reason is not None:
                raise GatewayError(reason)
    return True


def supervise(config: Config) -> int:
    """Run ``config.listen.workers`` workers until a signal; return the exit code."""
    # spawn, not fork: a forked child would inherit this process's threads' locks half-held.
    context = multiprocessing.get_context("spawn")
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    # A SIGHUP before the workers run (an early `systemctl reload`: the port takes connections
    # once bound) must neither end the gateway nor be lost: it is noted, and every worker is
    # asked to reload once all serve (_supervise).
    reloads = threading.Event()
    hangup = signal.signal(signal.SIGHUP, lambda _signum, _frame: reloads.set())
    try:
        hold = hold_outbox(config.outbox)  # refused here when another gateway has it
        try:
            sock = _bind(config)
        except BaseException:
            hold.release()
            raise
        try:
            return _supervise(config, context, stopping, on_signal, sock, reloads)
        finally:
            sock.close()
            hold.release()
    finally:
        signal.signal(signal.SIGHUP, hangup)


def _supervise(
    config: Config,
    context: multiprocessing.context.SpawnContext,
    stopping: threading.Event,
    on_signal: signal._HANDLER,
    sock: socket.socket,
    reloads: threading.Event,
) -> int:
    # A new, private folder per run: prometheus-client sums every file in it, so counts of an
    # earlier run must not be there. The workers inherit the variable, which prometheus-client
    # reads when they import it.
    _remove_stale_metrics_dirs(Path(tempfile.gettempdir()))
    try:
        metrics_dir = Path(tempfile.mkdtemp(prefix=f"{_METRICS_PREFIX}{os.getpid()}-"))
    except OSError as exc:
        raise GatewayError(
            f"cannot make the workers' metrics folder in {tempfile.gettempdir()}:"
            f" {exc.strerror or exc}; point TMPDIR at a writable folder"
        ) from exc
    workers: list[BaseProcess] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        # SIGHUP: every worker reloads. SIGUSR1: worker 0 has reloaded; the others follow.
        reloads.set()
        for index, process in enumerate(workers):
            if process.pid is not None and (signum == signal.SIGHUP or index > 0):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGHUP)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    # Ignored while the workers are spawned: they inherit that (through exec too), so a SIGHUP
    # cannot end one before its own handler is in place (gateway.runtime.process.run). Blocked
    # meanwhile here, so that one arriving now waits (Linux keeps a blocked signal pending even
    # while ignored) for the handler below instead of being lost.
    # SIGINT the same: a worker's Python raises KeyboardInterrupt from its start (a traceback
    # from the middle of an import) unless it inherits SIGINT ignored; this process notes
    # a Ctrl-C that comes meanwhile and stops once they are spawned. multiprocessing starts
    # its resource tracker at the first spawn with SIGINT blocked and then unblocks it,
    # which here would let a Ctrl-C meet SIG_IGN and be lost: it is started before.
    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGINT})
    pending = signal.sigpending()
    if signal.SIGHUP in pending:
        reloads.set()  # setting SIG_IGN discards a pending signal: note it first
    if signal.SIGINT in pending:
        stopping.set()
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    previous[_RELOAD_OTHERS] = signal.signal(_RELOAD_OTHERS, forward)
    previous_env = os.environ.get(MULTIPROCESS_ENV)
    os.environ[MULTIPROCESS_ENV] = str(metrics_dir)
    process: BaseProcess
    reports: list[Connection] = []
    try:
        for index in range(config.listen.workers):
            report, report_end = context.Pipe(duplex=False)
            reports.append(report)
            process = context.Process(
                target=_worker,
                args=(
                    config,
                    index,
                    channel_name(os.getpid()),
                    metrics_dir,
                    sock,
                    os.getpid(),
                    report_end,
                ),
                name=f"waba-gateway-worker-{index}",
            )
            process.start()
            report_end.close()  # the worker's end: only the worker holds it now
            workers.append(process)
        # Reloads are passed on from now. A worker still starting may ignore one (until its
        # handler is in place), so once all serve, every worker is asked again.
        signal.signal(signal.SIGHUP, forward)
        signal.signal(signal.SIGINT, on_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP, signal.SIGINT})
        if not _started(workers, reports, stopping):
            return 0  # a signal came first
        log.info("started %d workers", len(workers))
        if reloads.is_set():
            forward(signal.SIGHUP, None)
        failed = False
        while not stopping.is_set():
            stopping.wait(0.5)
            if any(not p.is_alive() for p in workers) and not stopping.is_set():
                log.error("a worker exited unexpectedly; stopping the others")
                failed = True
                break
        return 1 if failed else 0
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP, signal.SIGINT})
        for report in reports:
            report.close()
        for process in workers:
            if process.is_alive() and process.pid is not None:
                process.terminate()  # SIGTERM: each worker shuts down cleanly
        for process in workers:
            process.join(_STOP_GRACE_S)
            if process.is_alive():
                process.kill()
                process.join()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if previous_env is None:
            os.environ.pop(MULTIPROCESS_ENV, None)
        else:
            os.environ[MULTIPROCESS_ENV] = previous_env
        shutil.rmtree(metrics_dir, ignore_errors=True)
