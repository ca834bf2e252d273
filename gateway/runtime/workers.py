"""``[listen] workers = N``: N acceptor processes on one port, exactly one dispatcher.

Rule: the supervisor (the process ``serve`` started) binds nothing and forwards nothing; it starts
N worker processes that each bind the listener with SO_REUSEPORT, so the kernel spreads
connections across them. Worker 0 is the primary: it alone runs the dispatcher and the admin
listener; the others tell it when they have stored something (:mod:`gateway.runtime.wake`). All
share the SQLite outbox (WAL lets them write one after another and read at once), and all count into
one metrics folder the supervisor makes and removes, so worker 0's ``/metrics`` is the whole
gateway's (:mod:`gateway.runtime.stats`).

Signals: SIGTERM/SIGINT to the supervisor are passed to every worker, which shut down as a single
process would; the supervisor waits for them and exits 0. SIGHUP is ignored while the workers
start (by default it would end them half-started). Workers ask the kernel to send them
SIGTERM if the supervisor dies (PR_SET_PDEATHSIG), so none is left behind even after a SIGKILL.
If a worker dies on its own, the supervisor stops the others and exits 1: a half-running gateway
is worse than a restart by the service manager. SIGHUP to the supervisor is passed to every
worker, and each reloads (:meth:`gateway.runtime.gateway.Gateway.reload`); a reload asked of
worker 0 through the admin API or its file watcher reaches the others through the supervisor
(SIGUSR1 from worker 0: "reload the others").
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from gateway.config import Config
from gateway.errors import GatewayError
from gateway.runtime.gateway import serve_process
from gateway.runtime.logs import setup_logging
from gateway.runtime.stats import MULTIPROCESS_ENV
from gateway.runtime.wake import channel_name

__all__ = ["supervise"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_STOP_GRACE_S = 30.0
_RELOAD_OTHERS = signal.SIGUSR1


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _ask_supervisor_to_reload_the_others() -> None:
    os.kill(os.getppid(), _RELOAD_OTHERS)


def _worker(config: Config, index: int, wake_channel: str, metrics_dir: Path) -> None:
    _die_with_parent()
    setup_logging(config.log_level, config.log_format)
    serve_process(
        config,
        primary=index == 0,
        reuse_port=True,
        wake_channel=wake_channel,
        metrics_dir=metrics_dir,
        reload_siblings=_ask_supervisor_to_reload_the_others if index == 0 else None,
    )


def supervise(config: Config) -> int:
    """Run ``config.listen.workers`` workers until a signal; return the exit code."""
    # spawn, not fork: a forked child would inherit this process's threads' locks half-held.
    context = multiprocessing.get_context("spawn")
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    # A new, private folder per run: prometheus-client sums every file in it, so counts of an
    # earlier run must not be there. The workers inherit the variable, which prometheus-client
    # reads when they import it.
    try:
        metrics_dir = Path(tempfile.mkdtemp(prefix=f"waba-gateway-metrics-{os.getpid()}-"))
    except OSError as exc:
        raise GatewayError(
            f"cannot make the workers' metrics folder in {tempfile.gettempdir()}:"
            f" {exc.strerror or exc}; point TMPDIR at a writable folder"
        ) from exc
    workers: list[BaseProcess] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        # SIGHUP: every worker reloads. SIGUSR1: worker 0 has reloaded; the others follow.
        for index, process in enumerate(workers):
            if process.pid is not None and (signum == signal.SIGHUP or index > 0):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGHUP)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    # Ignored while the workers start: they inherit it (through exec too), so a SIGHUP cannot
    # end one before its own handler is in place (gateway.runtime.gateway.run).
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    previous[_RELOAD_OTHERS] = signal.signal(_RELOAD_OTHERS, forward)
    previous_env = os.environ.get(MULTIPROCESS_ENV)
    os.environ[MULTIPROCESS_ENV] = str(metrics_dir)
    process: BaseProcess
    try:
        for index in range(config.listen.workers):
            process = context.Process(
                target=_worker,
                args=(config, index, channel_name(os.getpid()), metrics_dir),
                name=f"waba-gateway-worker-{index}",
            )
            process.start()
            workers.append(process)
        log.info("started %d workers", len(workers))
        signal.signal(signal.SIGHUP, forward)
        failed = False
        while not stopping.is_set():
            stopping.wait(0.5)
            if any(not p.is_alive() for p in workers) and not stopping.is_set():
                log.error("a worker exited unexpectedly; stopping the others")
                failed = True
                break
        return 1 if failed else 0
    finally:
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
