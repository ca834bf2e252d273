"""The slow-down of failed admin authentications as tables (gateway.admin.throttle)."""

from __future__ import annotations

import pytest

from gateway.admin.throttle import (
    FIRST_WAIT_S,
    FORGET_AFTER_S,
    MAX_ADDRESSES,
    MAX_STEP_S,
    MAX_WAIT_S,
    AuthThrottle,
)


def test_each_failure_waits_twice_as_long_up_to_the_step_limit() -> None:
    """One guess after another from one address: 0.05, 0.1, 0.2 ... then MAX_STEP_S each."""
    throttle = AuthThrottle()
    now, waits = 0.0, []
    for _ in range(8):
        wait = throttle.failed("192.0.2.1", now)
        waits.append(wait)
        now += wait  # the next guess comes once the answer did
    assert waits == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])
    assert waits[0] == FIRST_WAIT_S
    assert max(waits) == MAX_STEP_S


def test_parallel_failures_queue_behind_each_other_but_never_wait_past_the_bound() -> None:
    """Guesses sent at once from one address are answered one step apart, none later than
    MAX_WAIT_S: parallel connections guess no faster than one."""
    throttle = AuthThrottle()
    waits = [throttle.failed("192.0.2.1", 10.0) for _ in range(6)]
    assert waits == pytest.approx([0.05, 0.15, 0.35, 0.75, 1.55, MAX_WAIT_S])
    assert [throttle.failed("192.0.2.1", 10.0) for _ in range(3)] == [MAX_WAIT_S] * 3


def test_addresses_are_slowed_apart() -> None:
    """A neighbour's guesses do not slow the operator at another address."""
    throttle = AuthThrottle()
    for _ in range(5):
        throttle.failed("192.0.2.1", 0.0)
    assert throttle.failed("192.0.2.2", 0.0) == FIRST_WAIT_S


@pytest.mark.parametrize(
    ("forget", "expected"),
    [("success", FIRST_WAIT_S), ("quiet", FIRST_WAIT_S), ("nothing", 0.4 - 0.35 + 0.4)],
)
def test_failures_are_forgotten_after_a_success_or_a_quiet_spell(
    forget: str, expected: float
) -> None:
    """A success, or FORGET_AFTER_S without a failure, starts the address afresh."""
    throttle = AuthThrottle()
    for _ in range(3):
        throttle.failed("192.0.2.1", 0.0)  # answered at 0.05, 0.15, 0.35
    now = 0.3
    if forget == "success":
        throttle.succeeded("192.0.2.1")
    elif forget == "quiet":
        now = FORGET_AFTER_S
    assert throttle.failed("192.0.2.1", now) == pytest.approx(expected)


def test_memory_is_bounded_whatever_the_addresses() -> None:
    """Failures from more addresses than MAX_ADDRESSES keep only the most recent ones."""
    throttle = AuthThrottle()
    for n in range(MAX_ADDRESSES + 100):
        throttle.failed(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", float(n))
    assert len(throttle) == MAX_ADDRESSES
