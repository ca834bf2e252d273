from __future__ import annotations

import asyncio
import contextlib
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from importlib.metadata import version

import aiohttp
import cryptography
import pytest
import uvloop
from brokers import BrokerServer, nats_server, redis_server

# Under CI a skip fails the run (tests/support/ci.py): these hooks are registered from here.
from ci import pytest_make_collect_report, pytest_runtest_makereport
from destinations import (
    KINDS,
    Destination,
    HttpDestination,
    NatsDestination,
    RedisDestination,
)
from pgserver import PgServer, running_server
from pki import Pki, make_pki
from sink import Sink

__all__ = ["pytest_make_collect_report", "pytest_runtest_makereport"]

# The event loops a gateway may be told to run on (listen.loop), each by its setting's name.
LOOPS: Mapping[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
# The suites that run in-process on each of them: everything between the socket and the
# callback's answer, where one loop's transports differ from another's. (The gateways of
# test_faults_processes run in processes of their own, on the loop their configuration names.)
_ON_EVERY_LOOP = (
    "tests/edge/test_listener.py",
    "tests/edge/test_front_doors.py",
    "tests/delivery/test_pipelining.py",
    "tests/edge/test_proxy_edge.py",
    "tests/adversarial/test_attacks_",
    "tests/adversarial/test_faults.py",
)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Run the listener, front-door and adversarial suites' tests once on each loop."""
    if item.nodeid.startswith(_ON_EVERY_LOOP):
        return LOOPS
    return {"asyncio": asyncio.new_event_loop}


def pytest_report_header(config: pytest.Config) -> list[str]:
    # A TLS failure in CI is often a library difference: print the versions that decide it.
    return [
        f"{ssl.OPENSSL_VERSION}, aiohttp {aiohttp.__version__}, "
        f"cryptography {cryptography.__version__}, uvloop {version('uvloop')}"
    ]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Meta-like, impostor, wrong-CN, expired and server certificates, new for each run."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    """A target server on 127.0.0.1 that records each request and answers as a test tells it."""
    async with Sink() as running:
        yield running


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A real PostgreSQL server for the whole run, owned by an unprivileged user, on a Unix
    socket and a loopback port; stopped and removed at the end."""
    with running_server() as server:
        yield server


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A new, empty database on the test server, for this test alone (over the socket)."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    pg_server.psql(f"CREATE DATABASE {name}")
    return pg_server.socket_url(name)


@pytest.fixture(scope="session")
def redis() -> Iterator[BrokerServer]:
    """A real Redis server (Debian's redis-server) on loopback for the whole run."""
    with redis_server() as server:
        yield server


@pytest.fixture(scope="session")
def nats() -> Iterator[BrokerServer]:
    """A real NATS server with JetStream (Debian's nats-server -js) for the whole run."""
    with nats_server() as server:
        yield server


@pytest.fixture(params=KINDS)
async def destination(request: pytest.FixtureRequest, sink: Sink) -> AsyncIterator[Destination]:
    """A target of each kind in turn (HTTP sink, Redis stream, NATS JetStream), empty, and its
    server up again after the test whatever the test did to it."""
    found: Destination
    if request.param == "redis":
        server: BrokerServer = request.getfixturevalue("redis")
        redis_destination = RedisDestination(server)
        await redis_destination.flush()
        found = redis_destination
    elif request.param == "nats":
        server = request.getfixturevalue("nats")
        nats_destination = NatsDestination(server)
        await nats_destination.reset()
        found = nats_destination
    else:
        found = HttpDestination(sink)
    try:
        yield found
    finally:
        if request.param != "http":
            with contextlib.suppress(AssertionError):
                await found.up()  # already up: nothing to do
