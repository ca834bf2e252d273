"""A target's lane: what a claim may ask for, how its batches are cut, and what a reload keeps."""

from __future__ import annotations

import pytest
from brokers import pending_delivery

from gateway.config import TargetConfig
from gateway.delivery.backoff import RetryPolicy
from gateway.delivery.lanes import BATCH_BYTES, Lane, batch_size
from gateway.outbox import Delivery

TARGET = TargetConfig(name="t", url="http://127.0.0.1:9/hook", concurrency=8, pipeline=4)


def _delivery(number: int, size: int = 10) -> Delivery:
    return pending_delivery(number, b"x" * size, prefix="d")


def _lane(*, load: int = 0, busy: int = 0, failures: int = 0, paused_until: float = 0.0) -> Lane:
    lane = Lane.open(TARGET)
    lane.load, lane.busy = load, busy
    lane.health.failures, lane.health.paused_until = failures, paused_until
    return lane


@pytest.mark.parametrize(
    ("load", "busy", "failures", "paused_until", "room"),
    [
        pytest.param(0, 0, 0, 0.0, 10, id="healthy-and-idle-asks-for-its-whole-budget"),
        pytest.param(7, 3, 0, 0.0, 3, id="healthy-asks-for-what-is-left"),
        pytest.param(10, 0, 0, 0.0, 0, id="budget-used-up-asks-for-none"),
        pytest.param(12, 0, 0, 0.0, 0, id="over-budget-after-a-smaller-reload-asks-for-none"),
        pytest.param(0, 0, 2, 200.0, 0, id="paused-asks-for-none"),
        pytest.param(0, 0, 2, 50.0, 1, id="probing-asks-for-one"),
        pytest.param(1, 1, 2, 50.0, 0, id="probing-with-its-probe-out-asks-for-none"),
    ],
)
def test_room_is_the_budget_left_one_while_probing_none_while_paused(
    load: int, busy: int, failures: int, paused_until: float, room: int
) -> None:
    """A claim asks for the budget's rest, one probe after a pause, nothing during one."""
    lane = _lane(load=load, busy=busy, failures=failures, paused_until=paused_until)
    assert lane.room(100.0, capacity=10) == room


@pytest.mark.parametrize(
    ("queued", "busy", "sizes"),
    [
        pytest.param(10, 0, [4, 4], id="cut-at-pipeline-until-concurrency-is-reached"),
        pytest.param(3, 0, [3], id="fewer-than-pipeline-go-in-one"),
        pytest.param(10, 6, [2], id="what-concurrency-leaves"),
        pytest.param(10, 8, [], id="none-at-concurrency"),
        pytest.param(0, 0, [], id="none-when-nothing-is-queued"),
    ],
)
def test_batches_are_cut_by_pipeline_and_concurrency(
    queued: int, busy: int, sizes: list[int]
) -> None:
    """Each batch holds at most ``pipeline``; together no more than ``concurrency`` go out."""
    lane = _lane(busy=busy)
    for number in range(queued):
        lane.push(_delivery(number))
    cut = []
    while batch := lane.next_batch():
        cut.append(len(batch))
    assert cut == sizes
    assert lane.busy == busy + sum(sizes)
    assert (lane.load, len(lane.queue)) == (queued, queued - sum(sizes))


@pytest.mark.parametrize(
    ("sizes", "most", "expected"),
    [
        pytest.param([10, 10, 10], 32, 3, id="small-bodies-all-go"),
        pytest.param([BATCH_BYTES // 2] * 3, 32, 2, id="stops-before-the-byte-limit"),
        pytest.param([BATCH_BYTES + 1, 10], 32, 1, id="a-larger-body-goes-alone"),
        pytest.param([10] * 5, 2, 2, id="at-most-most"),
        pytest.param([], 32, 0, id="empty-queue"),
    ],
)
def test_batch_size_stops_at_the_byte_limit_unless_the_first_is_larger(
    sizes: list[int], most: int, expected: int
) -> None:
    """A batch's bodies stay within BATCH_BYTES; a body larger than that still goes, alone."""
    queue = [_delivery(number, size) for number, size in enumerate(sizes)]
    assert batch_size(queue, most) == expected


def test_renewing_a_lane_keeps_its_health_budget_and_queue() -> None:
    """A reload that changes a target replaces its sender and policy, and nothing else."""
    lane = _lane(load=3, busy=2, failures=1, paused_until=50.0)
    lane.queue.append(_delivery(1))
    health, sender = lane.health, lane.sender
    changed = TargetConfig(name="t", url="http://127.0.0.1:9/other", attempts=3)
    assert lane.renew(changed) is sender
    assert lane.sender is not sender
    assert lane.sender.target is changed
    assert lane.policy == RetryPolicy.for_target(changed)
    assert lane.health is health
    assert (lane.load, lane.busy, len(lane.queue)) == (3, 2, 1)


def test_reopening_a_removed_lane_keeps_its_budget_with_fresh_health() -> None:
    """Configured again while its old batches are out: they still count; its failures do not."""
    lane = _lane(load=3, busy=3, failures=4, paused_until=500.0)
    lane.reopen(TARGET)
    assert (lane.load, lane.busy) == (3, 3)
    assert lane.health.failures == 0
    assert lane.circuit(100.0) == "closed"


@pytest.mark.parametrize(
    ("failures", "paused_until", "circuit"),
    [
        pytest.param(0, 0.0, "closed", id="no-failures"),
        pytest.param(1, 150.0, "open", id="paused"),
        pytest.param(1, 50.0, "half_open", id="pause-over-probing"),
    ],
)
def test_circuit_reads_the_health_at_a_time(
    failures: int, paused_until: float, circuit: str
) -> None:
    """Closed without failures; open while paused; half-open once the pause is over."""
    assert _lane(failures=failures, paused_until=paused_until).circuit(100.0) == circuit
