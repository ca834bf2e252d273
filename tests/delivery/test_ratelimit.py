"""A target's rate limit (gateway.delivery.ratelimit, gateway.delivery.pacing): the token
bucket's arithmetic, then a backlog of 200 measured at the target, from one gateway and from
two gateways sharing PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from config_files import host_configs, listen_port
from helpers import gateway_config, message_body, sink_target
from pki import Pki
from processes import post_to, serving_all
from sink import DEADLINE_S, Received, Reply, Sink

from gateway.config import OutboxConfig, TargetConfig
from gateway.delivery.pacing import Pacing
from gateway.delivery.ratelimit import TokenBucket
from gateway.outbox import open_outbox
from gateway.runtime.gateway import Gateway

RATE = 20.0
BACKLOG = 200
_SKEW_S = 0.25


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # (time, tokens wanted) -> tokens granted at each step
        ([(0.0, 5)], [5]),
        ([(0.0, 10)], [5]),  # never more than the burst
        ([(0.0, 5), (0.0, 1)], [5, 0]),
        ([(0.0, 5), (0.1, 5)], [5, 0]),  # 0.1 s at 2/s: no whole token yet
        ([(0.0, 5), (0.5, 5)], [5, 1]),
        ([(0.0, 5), (100.0, 9)], [5, 5]),  # a long quiet spell refills up to the burst only
        ([(0.0, 5), (-10.0, 5)], [5, 0]),  # a clock stepping back refills nothing
        ([(0.0, 0)], [0]),
    ],
)
def test_token_bucket_grants_the_burst_then_the_rate(
    steps: list[tuple[float, int]], expected: list[int]
) -> None:
    """take() grants whole tokens up to what is in the bucket, refilled at rate_per_s up to
    the burst."""
    bucket = TokenBucket.full(2.0, 5, 0.0)
    assert [bucket.take(now, want) for now, want in steps] == expected


def test_token_bucket_gives_back_and_says_how_long_to_wait() -> None:
    """Tokens not used are given back (never past the burst); wait_s says when the next
    whole token comes."""
    bucket = TokenBucket.full(4.0, 2, 0.0)
    assert bucket.take(0.0, 2) == 2
    assert bucket.wait_s(0.0) == pytest.approx(0.25)
    bucket.give_back(5)
    assert bucket.take(0.0, 10) == 2
    assert bucket.wait_s(0.125) == pytest.approx(0.125)


@pytest.mark.parametrize(
    ("spent", "at", "rate", "burst", "expected"),
    [
        # Rate 10/s, burst 10, `spent` taken at 0.0, retuned at `at` to (rate, burst): how many
        # the new bucket grants at once.
        (10, 0.01, 5.0, 5, 0),  # lowered right after a burst: no second burst
        (10, 0.01, 20.0, 20, 0),  # raised: the same
        (10, 0.5, 20.0, 20, 5),  # what refilled at the old rate before the reload stays
        (0, 0.0, 5.0, 5, 5),  # a full bucket keeps at most the new burst
        (0, 0.0, 20.0, 20, 10),  # and does not grow to a larger one
    ],
)
def test_a_retuned_token_bucket_keeps_its_tokens_up_to_the_new_burst(
    spent: int, at: float, rate: float, burst: int, expected: int
) -> None:
    """A reload that changes the limit keeps the tokens the bucket holds (at most the new
    burst): it never hands out a fresh burst on top of one just spent."""
    bucket = TokenBucket.full(10.0, 10, 0.0)
    assert bucket.take(0.0, spent) == spent
    assert bucket.retuned(rate, burst, at).take(at, 100) == expected


async def test_a_reload_that_changes_the_rate_hands_out_no_fresh_burst(tmp_path: Path) -> None:
    """The dispatcher's pacing on a SQLite outbox (its own bucket): a claim spends the burst of
    10 at 0.0, a reload at 0.01 lowers the rate to 5/s, and the next claim may start nothing
    until the new rate has made a token."""
    outbox = await open_outbox(OutboxConfig(path=tmp_path / "outbox.sqlite3"))
    try:
        pacing = Pacing([_limited(10.0)], 0.0)
        assert (await pacing.plan(outbox, {"t": 100}, 0.0)).limits == {"t": 10}
        pacing.reconfigure([_limited(5.0)], 0.01)
        assert (await pacing.plan(outbox, {"t": 100}, 0.01)).limits.get("t", 0) == 0
        assert (await pacing.plan(outbox, {"t": 100}, 0.25)).limits == {"t": 1}
    finally:
        await outbox.close()


async def test_an_idle_rate_limited_target_waits_for_the_poll_not_for_its_next_token(
    tmp_path: Path,
) -> None:
    """A claim asks for the target's whole free budget, more than its burst: granted fewer
    tokens than it asked for, the target is short of tokens, but a claim that found fewer due
    deliveries than it was granted means nothing more is due, and the dispatcher sleeps for
    its poll interval rather than claiming again at its next token (every 5 ms on an idle
    gateway). A claim that used every token it got waits for the next one."""
    outbox = await open_outbox(OutboxConfig(path=tmp_path / "outbox.sqlite3"))
    try:
        pacing = Pacing([_limited(10.0)], 0.0)
        idle = await pacing.plan(outbox, {"t": 256}, 0.0)
        assert idle.limits == {"t": 10}
        await pacing.settle(outbox, idle, {"t": 0}, [])
        assert pacing.wait_s(0.0, 0.5) == 0.5
        busy = await pacing.plan(outbox, {"t": 256}, 1.0)
        assert busy.limits == {"t": 10}
        await pacing.settle(outbox, busy, {"t": 10}, [])
        assert pacing.wait_s(1.0, 0.5) == pytest.approx(0.1)  # one token's time at 10/s
    finally:
        await outbox.close()


def _limited(rate: float) -> TargetConfig:
    return TargetConfig(name="t", url="http://127.0.0.1:9/t", rate_per_s=rate)


async def _post_all(pki: Pki, ports: list[int], bodies: list[bytes]) -> set[int]:
    """POST every body as Meta does, spread over the gateways on ``ports``, on a few kept-alive
    connections (a few hundred handshakes at once would starve the gateways of CPU, and then
    the time between a token and its request would be the machine's, not the limit's)."""
    connector = aiohttp.TCPConnector(limit=4)
    async with aiohttp.ClientSession(connector=connector) as session:
        return set(
            await asyncio.gather(
                *(
                    post_to(ports[n % len(ports)], pki, body, session=session)
                    for n, body in enumerate(bodies)
                )
            )
        )


def _within_rate(arrivals: list[float], rate: float, burst: int) -> None:
    """No span of the arrivals holds more than burst + rate * span, give or take the time
    between a token and its request reaching the target (a burst's requests queue on one
    connection, on a machine shared with other work): a quarter of a second, and one request."""
    times = sorted(arrivals)
    for i in range(len(times)):
        for j in range(i + 1, len(times)):
            count = j - i + 1
            allowed = burst + rate * (times[j] - times[i] + _SKEW_S) + 1
            assert count <= allowed, f"{count} requests in {times[j] - times[i]:.3f}s"


async def test_a_backlog_reaches_the_target_at_its_rate_and_waits_are_not_attempts(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """rate_per_s = 20: a backlog of 200 arrives at no more than 20 per second plus one burst,
    and every delivery is delivered at its first attempt (waiting is not an attempt)."""
    target = sink_target(sink, rate_per_s=RATE, attempts=1)
    config = gateway_config(pki, tmp_path, targets=[target])
    bodies = [message_body(f"paced {n}") for n in range(BACKLOG)]
    async with Gateway(config) as gateway:
        started = time.monotonic()
        assert await _post_all(pki, [gateway.port], bodies) == {200}
        received = await _all(sink, BACKLOG)
        _within_rate([r.at for r in received], RATE, target.burst_size)
        assert received[-1].at - started >= (BACKLOG - target.burst_size) / RATE - 1
        delivered = await gateway.outbox.query(state="delivered", limit=BACKLOG)
        assert len(delivered) == BACKLOG
        assert {d.attempts for d in delivered} == {1}


async def test_waiting_for_the_rate_limit_does_not_age_a_delivery_into_a_dead_letter(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """At 2 per second with a burst of 1, the last of 6 deliveries waits about 2.5 s for its
    token, longer than max_age_s = 1.5; its first attempt fails (503): it is retried and
    delivered, not dead-lettered for an age spent waiting for the limit."""
    target = TargetConfig(
        name="sink",
        url=sink.url("/sink"),
        rate_per_s=2.0,
        burst=1,
        max_age_s=1.5,
        retry_schedule_s=(0.5,),
    )
    sink.script(*[Reply()] * 5, Reply(status=503))
    config = gateway_config(pki, tmp_path, targets=[target])
    bodies = [message_body(f"aged {n}") for n in range(6)]
    async with Gateway(config) as gateway:
        assert await _post_all(pki, [gateway.port], bodies) == {200}
        deadline = time.monotonic() + DEADLINE_S
        while len(await gateway.outbox.query(state="delivered", limit=10)) < 6:
            assert not await gateway.outbox.query(state="dead"), "dead-lettered"
            assert time.monotonic() < deadline, "not all delivered"
            await asyncio.sleep(0.05)
        delivered = await gateway.outbox.query(state="delivered", limit=10)
        assert sorted(d.attempts for d in delivered) == [1, 1, 1, 1, 1, 2]
    assert len(sink.at("/sink")) == 7


async def _all(sink: Sink, count: int) -> list[Received]:
    """The first ``count`` requests on /sink, given the time the rate needs for them."""
    deadline = time.monotonic() + count / RATE + DEADLINE_S
    while len(sink.at("/sink")) < count:
        assert time.monotonic() < deadline, f"{len(sink.at('/sink'))} of {count} arrived"
        await asyncio.sleep(0.05)
    return sink.at("/sink")


async def test_the_rate_holds_for_two_gateways_sharing_postgresql(
    pki: Pki, tmp_path: Path, pg_url: str, sink: Sink
) -> None:
    """Two gateways on one database, each given half of a backlog of 200: together they
    send no more than 20 per second plus one burst."""
    configs = host_configs(
        pki,
        tmp_path,
        2,
        target_url=sink.url("/sink"),
        outbox=f'url = "{pg_url}"',
        extra=f"rate_per_s = {RATE:g}",
    )
    ports = [listen_port(config) for config in configs]
    with contextlib.ExitStack() as stack:
        gateways = await serving_all(stack, configs)
        bodies = [message_body(f"shared pace {n}") for n in range(BACKLOG)]
        assert await _post_all(pki, ports, bodies) == {200}
        received = await _all(sink, BACKLOG)
        _within_rate([r.at for r in received], RATE, int(RATE))
        for process in gateways:
            process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(process.wait, DEADLINE_S) == 0
