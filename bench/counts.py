"""Load-independent counts of what a draining dispatcher does: claims, their looks and their
deliveries, the writer's commits, batches, the event loop's turns, tasks and timers.

Rule: a bench tool, never imported by the gateway. It wraps functions of the running process
(class attributes and module functions, looked up at each call) with counters, so the code
measured is the code that runs, at full speed; the wrappers cost a few hundred nanoseconds per
call, about the same in every mode compared.

Two ways in:

- in-process (``bench/drain.py``): ``install()``, then ``snapshot()`` around the drain;
- in a gateway started by a bench (``bench/ordering.py --counts``): this folder's
  ``counting/sitecustomize.py`` on the gateway's ``PYTHONPATH`` with ``WABA_BENCH_COUNTS`` set
  to a file calls ``install()`` at the interpreter's start and appends one JSON line of
  ``snapshot()`` to that file at each ``SIGUSR2``; the bench signals at the drain's start and
  end and takes the difference.

What each count is (``per_delivery()`` divides by the deliveries recorded):

claims            calls of the outbox's ``due`` (the dispatcher's claims)
claimed           deliveries those handed out (first ones and their runs)
keys_asked        conversations asked about by key, over every claim
full_looks        ordered targets a claim looked at in full (every conversation)
cycles            turns of the dispatcher's loop that ran a claim's plan (``_claim``)
wakes             sets of the dispatcher's wake-up event
batches, sent     batches handed to senders, and their deliveries
recorded          outcomes recorded (``record_many``'s attempts)
commits, jobs     write transactions of the SQLite writer, and the jobs in them
reads             read transactions of the SQLite writer (a claim alone)
loop_turns        turns of the event loop (``_run_once``: one ``select()`` each)
tasks, timers     tasks created, and timer handles (``call_at``, ``call_later``)
soon              callbacks scheduled with ``call_soon``
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
import functools
import json
import os
import signal
from collections import Counter
from collections.abc import Callable
from typing import Any

__all__ = ["COUNTS", "install", "per_delivery", "snapshot"]

COUNTS: Counter[str] = Counter()
_installed = False


def _wrap(owner: Any, name: str, count: Callable[..., None]) -> None:
    original = getattr(owner, name)
    if asyncio.iscoroutinefunction(original):

        @functools.wraps(original)
        async def wrapper_async(*args: Any, **kwargs: Any) -> Any:
            result = await original(*args, **kwargs)
            count(result, *args, **kwargs)
            return result

        setattr(owner, name, wrapper_async)
        return

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        count(result, *args, **kwargs)
        return result

    setattr(owner, name, wrapper)


def _bump(name: str) -> Callable[..., None]:
    def count(*_: Any, **__: Any) -> None:
        COUNTS[name] += 1

    return count


def _claim(result: Any, *args: Any, **kwargs: Any) -> None:
    COUNTS["claims"] += 1
    COUNTS["claimed"] += len(result)
    ordered = kwargs.get("ordered", ())
    keys = kwargs.get("conversations") or {}
    limits = args[2] if len(args) > 2 else kwargs.get("limits", {})
    for target in limits:
        if target in ordered:
            if target in keys:
                COUNTS["keys_asked"] += len(keys[target])
            else:
                COUNTS["full_looks"] += 1


def _recorded(result: Any, *args: Any, **kwargs: Any) -> None:
    COUNTS["records"] += 1
    COUNTS["recorded"] += len(args[1])


def _batch(result: Any, *args: Any, **kwargs: Any) -> None:
    COUNTS["batches"] += 1
    COUNTS["sent"] += len(args[2])


def install() -> None:
    """Wrap what is counted (once per process)."""
    global _installed
    if _installed:
        return
    _installed = True
    loop_class = asyncio.base_events.BaseEventLoop
    _wrap(loop_class, "_run_once", _bump("loop_turns"))
    _wrap(loop_class, "create_task", _bump("tasks"))
    _wrap(loop_class, "call_at", _bump("timers"))
    _wrap(loop_class, "call_soon", _bump("soon"))

    from gateway.delivery import dispatcher
    from gateway.outbox.sqlite import outbox as sqlite_outbox
    from gateway.outbox.sqlite import writer

    _wrap(sqlite_outbox.SqliteOutbox, "due", _claim)
    _wrap(sqlite_outbox.SqliteOutbox, "record_many", _recorded)
    try:
        from gateway.outbox.postgres import outbox as pg_outbox
    except ImportError:  # without the postgres extra
        pass
    else:
        _wrap(pg_outbox.PostgresOutbox, "due", _claim)
        _wrap(pg_outbox.PostgresOutbox, "record_many", _recorded)

    def commit(result: Any, _self: Any, _conn: Any, _lock: Any, group: list[Any]) -> None:
        COUNTS["commits"] += 1
        COUNTS["jobs"] += len(group)

    _wrap(writer.Writer, "_commit", commit)
    _wrap(writer.Writer, "_read", _bump("reads"))
    _wrap(dispatcher.Dispatcher, "_claim", _bump("cycles"))
    _wrap(dispatcher.Dispatcher, "_send_queued", _bump("send_turns"))

    original_attempt = dispatcher.Dispatcher._attempt

    async def attempt(self: Any, lane: Any, batch: Any) -> None:
        _batch(None, self, lane, batch)
        await original_attempt(self, lane, batch)

    dispatcher.Dispatcher._attempt = attempt  # type: ignore[method-assign]

    class CountedEvent(asyncio.Event):
        def set(self) -> None:
            COUNTS["wakes"] += 1
            super().set()

    original_init = dispatcher.Dispatcher.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self._wake = CountedEvent()

    dispatcher.Dispatcher.__init__ = init  # type: ignore[method-assign]


def io_counts(pid: int | str = "self") -> dict[str, int]:
    """``/proc/PID/io``: bytes read and written through system calls (files and sockets:
    ``rchar``, ``wchar``), those calls (``syscr``, ``syscw``), and what reached the disk."""
    found = {}
    with open(f"/proc/{pid}/io") as lines:
        for line in lines:
            key, _, value = line.partition(":")
            found[key] = int(value)
    return found


def snapshot() -> dict[str, int]:
    return dict(COUNTS)


def difference(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {key: after.get(key, 0) - before.get(key, 0) for key in sorted(set(after) | set(before))}


def per_delivery(counts: dict[str, int], delivered: int | None = None) -> dict[str, float]:
    """Each count per delivery recorded, and the ratios that explain a drain: deliveries per
    claim, keys per claim, records per commit."""
    each = delivered or counts.get("recorded") or 1
    table: dict[str, float] = {key: round(value / each, 4) for key, value in counts.items()}
    if counts.get("claims"):
        table["claimed_per_claim"] = round(counts.get("claimed", 0) / counts["claims"], 1)
        table["keys_per_claim"] = round(counts.get("keys_asked", 0) / counts["claims"], 1)
    if counts.get("commits"):
        table["jobs_per_commit"] = round(counts.get("jobs", 0) / counts["commits"], 2)
    if counts.get("batches"):
        table["sent_per_batch"] = round(counts.get("sent", 0) / counts["batches"], 1)
    return table


def serve_from_environment() -> None:
    """In a gateway: install, and append a snapshot to ``$WABA_BENCH_COUNTS`` at each
    SIGUSR2 (see the module docstring)."""
    path = os.environ.get("WABA_BENCH_COUNTS")
    if not path:
        return
    install()

    def dump(*_: Any) -> None:
        with open(path, "a") as out:
            out.write(json.dumps(snapshot()) + "\n")

    signal.signal(signal.SIGUSR2, dump)
