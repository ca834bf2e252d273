"""SIGKILL under load: the gateway process group killed while requests are in flight, round
after round, then started once more; every notification answered 200 reaches the target.

The short, in-suite form of ``bench/killloop.py`` (whose long runs the README records): one and
two workers, the SQLite and the PostgreSQL outbox. At-least-once delivery allows duplicates (an
attempt in flight at the kill is sent again); losing an acknowledged notification is the failure.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from config_files import free_port, listen_port, write_config
from load import Load
from pki import Pki
from processes import kill_group, serving, stop, until_listening
from settling import pending_in_metrics, until_settled
from sink import DEADLINE_S, Sink

ROUNDS = 3
# Answers a round must have had before its kill: the gateway is serving, not starting.
ACKS_BEFORE_KILL = 10
# Requests sent and not yet answered at the moment of the kill, at least.
IN_FLIGHT_AT_KILL = 2


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_sigkill_with_requests_in_flight_loses_nothing_acknowledged(
    pki: Pki, tmp_path: Path, sink: Sink, request: pytest.FixtureRequest, backend: str, workers: int
) -> None:
    """Killed with SIGKILL (supervisor and workers) while requests are in flight, three rounds,
    then restarted: every notification answered 200 is delivered, none is left pending."""
    if backend == "postgres":
        outbox = f'url = "{request.getfixturevalue("pg_url")}"\nlease_s = 2'
    else:
        outbox = 'path = "outbox.sqlite3"'
    admin_port = free_port()
    config = write_config(
        pki,
        tmp_path,
        target_url=sink.url("/sink"),
        workers=workers,
        admin_port=admin_port,
        outbox=outbox,
    )
    port = listen_port(config)
    sent: set[bytes] = set()
    acked: set[bytes] = set()
    for number in range(ROUNDS):
        load = Load(port, pki, f"kill loop {number}")
        with serving(config) as gateway:
            await until_listening(port, gateway)
            load.start()
            try:
                await load.until(ACKS_BEFORE_KILL, IN_FLIGHT_AT_KILL)
                kill_group(gateway)  # at once: those requests are still in flight
            finally:
                await load.stop()
            assert gateway.returncode == -signal.SIGKILL
        sent |= load.sent
        acked |= load.acked
    with serving(config) as gateway:
        await until_listening(port, gateway)

        def delivered() -> set[bytes]:
            return {r.body for r in sink.at("/sink")}

        deadline = time.monotonic() + DEADLINE_S
        while lost := acked - delivered():
            assert time.monotonic() < deadline, f"{len(lost)} of {len(acked)} acknowledged lost"
            await asyncio.sleep(0.05)
        await until_settled(pending_in_metrics(admin_port), lambda: len(sink.at("/sink")))
        stop(gateway)
        assert gateway.returncode == 0
    assert acked <= delivered()
    assert delivered() <= sent, "the target received a body nobody sent"
