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

import aiohttp
import pytest
from config_files import free_port, listen_port, write_config
from helpers import message_body, meta_signature
from pki import Pki
from processes import kill_group, serving, stop, until_listening
from settling import pending_in_metrics, until_settled
from sink import DEADLINE_S, Sink

ROUNDS = 3
CLIENTS = 8
# Answers a round must have had before its kill: the gateway is serving, not starting.
ACKS_BEFORE_KILL = 10
# Requests sent and not yet answered at the moment of the kill, at least.
IN_FLIGHT_AT_KILL = 2


class _Load:
    """``CLIENTS`` keep-alive clients posting unique, signed notifications as Meta does, until
    stopped; what was answered 200 is acknowledged, anything else (refused, reset) is not."""

    def __init__(self, port: int, pki: Pki, round_number: int) -> None:
        self.url = f"https://localhost:{port}/webhook"
        self.pki = pki
        self.round = round_number
        self.sent: set[bytes] = set()
        self.acked: set[bytes] = set()
        self.in_flight = 0
        self.stopped = asyncio.Event()

    async def run(self) -> None:
        await asyncio.gather(*(self._client(number) for number in range(CLIENTS)))

    async def _client(self, number: int) -> None:
        connector = aiohttp.TCPConnector(ssl=self.pki.client_context("meta"), limit=1)
        timeout = aiohttp.ClientTimeout(total=DEADLINE_S)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            sequence = 0
            while not self.stopped.is_set():
                sequence += 1
                body = message_body(f"kill loop {self.round}.{number}.{sequence}")
                headers = {
                    "Content-Type": "application/json",
                    "X-Hub-Signature-256": meta_signature(body),
                }
                self.sent.add(body)
                self.in_flight += 1
                try:
                    async with session.post(self.url, data=body, headers=headers) as response:
                        await response.read()
                        if response.status == 200:
                            self.acked.add(body)
                except (aiohttp.ClientError, OSError):
                    await asyncio.sleep(0.01)  # not listening yet, or killed: not acknowledged
                finally:
                    self.in_flight -= 1

    async def until_loaded(self) -> None:
        """Return once the round had its answers and requests are in flight: time to kill."""
        deadline = time.monotonic() + DEADLINE_S
        while len(self.acked) < ACKS_BEFORE_KILL or self.in_flight < IN_FLIGHT_AT_KILL:
            assert time.monotonic() < deadline, (
                f"round {self.round}: {len(self.acked)} answered, {self.in_flight} in flight"
            )
            await asyncio.sleep(0.005)


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
        load = _Load(port, pki, number)
        with serving(config) as gateway:
            await until_listening(port, gateway)
            sending = asyncio.ensure_future(load.run())
            try:
                await load.until_loaded()
                in_flight = load.in_flight
                kill_group(gateway)
            finally:
                load.stopped.set()
                await sending
            assert gateway.returncode == -signal.SIGKILL
            assert in_flight >= IN_FLIGHT_AT_KILL
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
