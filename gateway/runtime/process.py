"""One serving process: its event loop, its signals, and a :class:`Gateway` until it is told
to stop.

Rule: a serving process reacts to signals here and nowhere else. SIGTERM and SIGINT (or the
injected ``shutdown`` awaitable in tests) stop the gateway in the order its module docstring
writes down (:mod:`gateway.runtime.gateway`); SIGHUP reloads it (:meth:`Gateway.reload`),
and one that arrives before the gateway serves is kept until it does. The event loop's handlers are
removed on the way out.

Once it serves, the process sets its cyclic garbage collector for a server
(:func:`settle_collector`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable

from gateway.config import Config, EventLoop
from gateway.runtime.gateway import LONE, Gateway, Role

__all__ = [
    "YOUNG_COLLECTION_EVERY",
    "event_loop_runner",
    "run",
    "serve_process",
    "settle_collector",
]

log = logging.getLogger(__name__)

# The cyclic garbage collector collects its youngest generation once allocations of container
# objects outnumber deallocations by this many (Python's default is 700). A gateway holds
# thousands of live objects for its deliveries in flight: the bodies a claim reads ahead for
# ordered runs, each a Delivery that lives until its run reaches it. Every 700 of those set off
# a collection that scans them all again and moves them to older generations, whose own
# collections then scan them too. Over an ordered drain of 10,000 deliveries that was 36 ms of
# collections (68 young, 7 middle, 1 full of 20 ms); at 10,000 and with the startup's objects
# frozen, 8 ms (two young collections; bench/README.md, "Issue 22: paired drains"). Garbage in
# reference cycles (an exception's traceback, a cancelled task) lives that many allocations
# longer at most.
YOUNG_COLLECTION_EVERY = 10_000


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
            # Not waiting for the other workers' answers with the event loop held: nobody
            # waits for this one's, and the outcome is logged once known.
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


def event_loop_runner(loop: EventLoop = "asyncio") -> asyncio.Runner:
    """A runner on the event loop ``listen.loop`` names, whatever else is installed."""
    if loop == "asyncio":
        return asyncio.Runner()
    import uvloop  # the `speed` extra; the configuration refuses "uvloop" without it

    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def settle_collector() -> None:
    """Set the garbage collector of a process that now serves: what it allocated to start
    (modules, configuration, TLS contexts, the application) is frozen, never scanned again by
    the collector (https://docs.python.org/3/library/gc.html#gc.freeze), and the youngest
    generation is collected every :data:`YOUNG_COLLECTION_EVERY` allocations. The older
    generations keep their thresholds."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_EVERY, middle, old)


def serve_process(
    config: Config, role: Role = LONE, on_ready: Callable[[Gateway], None] | None = None
) -> None:
    """One serving process, on the event loop ``listen.loop`` names, its garbage collector
    set for serving once it serves (:func:`settle_collector`)."""

    def ready(gateway: Gateway) -> None:
        settle_collector()
        if on_ready is not None:
            on_ready(gateway)

    # Until run() handles it, a SIGHUP (an early `systemctl reload`) must not end the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with event_loop_runner(config.listen.loop) as runner:
        runner.run(run(config, role=role, on_ready=ready))
