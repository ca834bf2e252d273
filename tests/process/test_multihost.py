"""Several gateways sharing one PostgreSQL outbox, as real processes: a gateway killed while it
holds claimed deliveries loses nothing, a body sent to two gateways is forwarded once, and the
database going away answers 503 until it is back."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from config_files import free_port, host_configs, listen_port, write_config
from helpers import message_body
from pgserver import PgServer, running_server
from pki import Pki
from processes import post_to, serving, serving_all, until_listening
from settling import pending_in_postgres, until_settled
from sink import DEADLINE_S, Sink


class _Blackhole:
    """A target that is down the slow way: it takes connections and never answers, so the
    gateways' attempts stay in flight (their claims held) until it goes away."""

    def __init__(self) -> None:
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def _hold(self, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)

    async def start(self, port: int) -> None:
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", port)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()


def _database(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


@pytest.fixture
async def blackhole() -> AsyncIterator[_Blackhole]:
    hole = _Blackhole()
    yield hole
    with contextlib.suppress(AssertionError):
        await hole.stop()


async def test_three_gateways_one_killed_with_claims_every_ack_delivered_once(
    pki: Pki, tmp_path: Path, pg_server: PgServer, pg_url: str, blackhole: _Blackhole
) -> None:
    """Three gateways on one database, a client spreading notifications over them (one body
    to two of them), the target hanging; SIGKILL one gateway while it holds claims, bring the
    target back: every acknowledged notification arrives exactly once, the dead gateway's
    after its lease ran out, delivered by the survivors."""
    target_port = free_port()
    await blackhole.start(target_port)
    configs = host_configs(
        pki,
        tmp_path,
        3,
        target_url=f"http://127.0.0.1:{target_port}/sink",
        outbox=f'url = "{pg_url}"\nlease_s = 1.5',
        extra="timeout_s = 30",
    )
    ports = [listen_port(config) for config in configs]
    bodies = [message_body(f"multi-host {n}") for n in range(30)]
    twice = message_body("sent to two gateways")
    with contextlib.ExitStack() as stack:
        gateways = await serving_all(stack, configs)
        async with aiohttp.ClientSession() as session:
            statuses = await asyncio.gather(
                *(
                    post_to(ports[n % 3], pki, body, session=session)
                    for n, body in enumerate(bodies)
                ),
                post_to(ports[0], pki, twice, session=session),
                post_to(ports[1], pki, twice, session=session),
            )
        assert statuses == [200] * (len(bodies) + 2)
        doomed = gateways[2]

        def held() -> int:
            """The deliveries the doomed gateway holds (owners are host:pid:random)."""
            owners = pg_server.psql(
                "SELECT lease_owner FROM waba_gateway.deliveries WHERE lease_owner IS NOT NULL",
                _database(pg_url),
            )
            return sum(f":{doomed.pid}:" in owner for owner in owners.splitlines())

        assert held() >= 1
        doomed.send_signal(signal.SIGKILL)
        assert await asyncio.to_thread(doomed.wait, DEADLINE_S) == -signal.SIGKILL
        await blackhole.stop()
        sink = Sink()
        sink.port = target_port  # the target comes back where it was
        async with sink:
            expected = sorted([*bodies, twice])
            await sink.wait_for(len(expected), "/sink")
            pending = pending_in_postgres(pg_server, _database(pg_url))
            await until_settled(pending, lambda: len(sink.at("/sink")))
            assert sorted(r.body for r in sink.at("/sink")) == expected
            left = "SELECT count(*) FROM waba_gateway.deliveries WHERE state <> 'delivered'"
            assert pg_server.psql(left, _database(pg_url)) == "0"
            assert held() == 0
        for survivor in gateways[:2]:
            survivor.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(survivor.wait, DEADLINE_S) == 0


async def test_deliveries_of_a_target_a_reload_removed_from_one_gateway_go_to_another_at_once(
    pki: Pki, tmp_path: Path, sink: Sink, blackhole: _Blackhole
) -> None:
    """Two gateways on one database forward to target ``sink``; one of them (A), whose ``sink``
    hangs, is reloaded without it while it holds deliveries of it, leased when it accepted
    them: one out on the wire, the rest queued behind it. A lets go of their leases once its
    attempt has ended, and the other gateway (B) sends them all, long before A's leases
    (lease_s = 60) would have run out. Renewed by A's heartbeat with the rest of its leases,
    they never reached B while A lived."""
    hole_port = free_port()
    await blackhole.start(hole_port)
    with running_server() as server:
        server.psql("CREATE DATABASE removed")
        outbox = f'url = "{server.socket_url("removed")}"\nlease_s = 60'
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        # A: one attempt at a time to the hanging sink, so the others wait queued, leased.
        other = '\n[[targets]]\nname = "other"\nurl = "http://127.0.0.1:9/o"\nfields = ["none"]\n'
        config_a = write_config(
            pki,
            tmp_path / "a",
            target_url=f"http://127.0.0.1:{hole_port}/sink",
            outbox=outbox,
            extra=f"concurrency = 1\npipeline = 1\ntimeout_s = 2\n{other}",
        )
        config_b = write_config(pki, tmp_path / "b", target_url=sink.url("/sink"), outbox=outbox)
        bodies = [message_body(f"removed target {n}") for n in range(6)]
        with contextlib.ExitStack() as stack:
            gateway_a, gateway_b = await serving_all(stack, [config_a, config_b])
            for body in bodies:
                assert await post_to(listen_port(config_a), pki, body) == 200
            head, _, rest = config_a.read_text().partition('[[targets]]\nname = "sink"')
            config_a.write_text(head + rest[rest.index("[[targets]]") :])
            gateway_a.send_signal(signal.SIGHUP)
            received = await asyncio.wait_for(sink.wait_for(len(bodies), "/sink"), 20.0)
            assert sorted(r.body for r in received) == sorted(bodies)
            assert gateway_a.poll() is None
            assert gateway_b.poll() is None
            for gateway in (gateway_a, gateway_b):
                gateway.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(gateway.wait, DEADLINE_S) == 0


async def test_database_going_away_gives_503_and_readyz_503_then_recovers(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """Database stopped while serving: 503 (never 200) and /readyz 503 within seconds; back:
    200 again without a restart, and what was acknowledged before is delivered."""
    admin_port = free_port()
    with running_server() as server:
        server.psql("CREATE DATABASE served")
        await sink.down()
        config = write_config(
            pki,
            tmp_path,
            target_url=sink.url("/sink"),
            admin_port=admin_port,
            outbox=f'url = "{server.socket_url("served")}"',
        )
        port = listen_port(config)
        with serving(config) as gateway:
            await until_listening(port, gateway)
            async with aiohttp.ClientSession() as session:
                before = message_body("before the outage")
                assert await post_to(port, pki, before, session=session) == 200
                await asyncio.to_thread(server.stop)
                started = time.monotonic()
                assert await post_to(port, pki, message_body("during"), session=session) == 503
                readyz = f"http://127.0.0.1:{admin_port}/readyz"
                async with session.get(readyz) as response:
                    assert response.status == 503
                assert time.monotonic() - started < 10.0
                await asyncio.to_thread(server.start)
                after = message_body("after the outage")
                deadline = time.monotonic() + DEADLINE_S
                while await post_to(port, pki, after, session=session) != 200:
                    assert time.monotonic() < deadline, "the gateway did not recover"
                    await asyncio.sleep(0.2)
                async with session.get(readyz) as response:
                    assert response.status == 200
            await sink.up()
            received = await sink.wait_for(2, "/sink")
            assert sorted(r.body for r in received) == sorted([before, after])
            gateway.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(gateway.wait, DEADLINE_S) == 0
