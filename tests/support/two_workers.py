"""Both workers of a two-worker gateway process serving: connections spread over them, and
what each accepted, read from its own counter file."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from helpers import message_body
from pki import Pki
from processes import post_to
from prometheus_client.multiprocess import MultiProcessCollector
from sink import DEADLINE_S

__all__ = ["accepted_by_each_worker", "post_over_both_workers"]


# Connections opened at once, at most. The workers accept on one shared socket, and asyncio
# accepts every connection waiting (up to its backlog) at each wake-up: a burst of 40 lands on
# whichever worker wakes first. A few at a time, the idle workers race for each.
_AT_ONCE = 4


async def _post_each_on_a_new_connection(port: int, pki: Pki, bodies: list[bytes]) -> None:
    """Each on a connection of its own, a few at a time (so that both workers take some)."""
    room = asyncio.Semaphore(_AT_ONCE)

    async def one(body: bytes) -> int:
        async with room:
            return await post_to(port, pki, body, fresh=True)

    statuses = await asyncio.gather(*(one(body) for body in bodies))
    assert statuses == [200] * len(bodies)


def accepted_by_each_worker(supervisor: int) -> dict[int, float]:
    """Worker pid -> notifications it accepted, from the counter file each worker keeps in the
    supervisor's metrics folder (prometheus_client's multiprocess mode: one file per pid)."""
    (folder,) = Path(tempfile.gettempdir()).glob(f"waba-gateway-metrics-{supervisor}-*")
    accepted = {}
    for path in folder.glob("counter_*.db"):
        if path.stat().st_size == 0:
            # A worker making its file (created empty, then sized): it has counted nothing yet,
            # and prometheus_client cannot read an empty file.
            accepted[int(path.stem.removeprefix("counter_"))] = 0.0
            continue
        samples = [
            sample.value
            # prometheus_client's merge() has no annotations.
            for family in MultiProcessCollector.merge([str(path)], accumulate=False)  # type: ignore[no-untyped-call]
            for sample in family.samples
            if sample.name == "waba_gateway_notifications_accepted_total"
        ]
        accepted[int(path.stem.removeprefix("counter_"))] = sum(samples)
    return accepted


def _served_by_both(supervisor: int, total: int) -> bool:
    """Both workers accepted some notifications, and all of them add up to ``total``."""
    accepted = accepted_by_each_worker(supervisor)
    assert sum(accepted.values()) == total, accepted
    return len([count for count in accepted.values() if count > 0]) == 2


async def post_over_both_workers(
    port: int, pki: Pki, supervisor: int, label: str, minimum: int
) -> list[bytes]:
    """At least ``minimum`` notifications, each on a new connection, a few at a time, and more
    until both workers have accepted some (a worker starved of CPU on a loaded machine may miss
    the first ones); the bodies sent."""
    bodies: list[bytes] = []
    deadline = time.monotonic() + DEADLINE_S
    while True:
        wave = [message_body(f"{label} {len(bodies) + n}") for n in range(_AT_ONCE)]
        await _post_each_on_a_new_connection(port, pki, wave)
        bodies += wave
        if len(bodies) >= minimum and _served_by_both(supervisor, len(bodies)):
            return bodies
        assert time.monotonic() < deadline, accepted_by_each_worker(supervisor)
