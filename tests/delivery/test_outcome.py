"""Retry policy and delivery outcome classification (gateway.delivery.backoff,
gateway.delivery.outcome)."""

from __future__ import annotations

import time

import pytest

from gateway.config import TargetConfig
from gateway.delivery.backoff import (
    RETRY_AFTER_LONGEST_S,
    RetryPolicy,
    TargetHealth,
    parse_retry_after,
)
from gateway.delivery.outcome import (
    AttemptResult,
    DeadLetter,
    Delivered,
    Outcome,
    RetryAt,
    classify,
    is_transient,
)

POLICY = RetryPolicy(
    attempts=5, wait_initial_s=1.0, wait_max_s=30.0, wait_exp_base=2.0, max_age_s=3600.0
)


def _upper(low: float, high: float) -> float:
    """The top of the jitter range, so expected times are exact."""
    return high


@pytest.mark.parametrize(
    ("attempt", "cap"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (60, 30.0), (5000, 30.0)],
)
def test_backoff_cap_grows_exponentially_then_clamps(attempt: int, cap: float) -> None:
    """cap = min(wait_max, wait_initial * base ** (attempt - 1)), without float overflow."""
    assert POLICY.cap(attempt) == cap


def test_delay_is_full_jitter_between_zero_and_cap() -> None:
    """delay() draws uniformly from [0, cap]."""
    seen: list[tuple[float, float]] = []

    def record(low: float, high: float) -> float:
        seen.append((low, high))
        return (low + high) / 2

    assert POLICY.delay(3, record) == 2.0
    assert seen == [(0.0, 4.0)]


@pytest.mark.parametrize(
    ("result", "attempt", "expected"),
    [
        pytest.param(AttemptResult(status=200), 1, Delivered(), id="200"),
        pytest.param(AttemptResult(status=204), 5, Delivered(), id="204-last-attempt"),
        pytest.param(AttemptResult(status=500), 1, RetryAt(1001.0, "HTTP 500"), id="500"),
        pytest.param(AttemptResult(status=503), 3, RetryAt(1004.0, "HTTP 503"), id="503-third"),
        pytest.param(AttemptResult(status=408), 1, RetryAt(1001.0, "HTTP 408"), id="408"),
        pytest.param(AttemptResult(status=429), 1, RetryAt(1001.0, "HTTP 429"), id="429"),
        pytest.param(
            AttemptResult(status=429, retry_after_s=120.0),
            1,
            RetryAt(1120.0, "HTTP 429"),
            id="429-retry-after-longer",
        ),
        pytest.param(
            AttemptResult(status=503, retry_after_s=0.0),
            2,
            RetryAt(1002.0, "HTTP 503"),
            id="retry-after-shorter-than-backoff",
        ),
        pytest.param(
            AttemptResult(error="timed out after 10s"),
            1,
            RetryAt(1001.0, "timed out after 10s"),
            id="timeout",
        ),
        pytest.param(
            AttemptResult(error="ClientConnectorError: refused"),
            2,
            RetryAt(1002.0, "ClientConnectorError: refused"),
            id="connection-error",
        ),
        pytest.param(AttemptResult(status=400), 1, DeadLetter("HTTP 400: not retryable"), id="400"),
        pytest.param(AttemptResult(status=404), 1, DeadLetter("HTTP 404: not retryable"), id="404"),
        pytest.param(
            AttemptResult(status=301), 1, DeadLetter("HTTP 301: not retryable"), id="redirect"
        ),
        pytest.param(
            AttemptResult(status=500),
            5,
            DeadLetter("HTTP 500: gave up after 5 attempt(s)"),
            id="attempts-exhausted",
        ),
        pytest.param(
            AttemptResult(status=429, retry_after_s=7200.0),
            1,
            DeadLetter("HTTP 429: max_age_s (3600) would be exceeded"),
            id="past-max-age",
        ),
        pytest.param(
            AttemptResult(accepted=True, response_excerpt="entry 1-0"),
            5,
            Delivered(),
            id="broker-ack",
        ),
        pytest.param(
            AttemptResult(error="no stream captures subject 'x'", permanent=True),
            1,
            DeadLetter("no stream captures subject 'x': not retryable"),
            id="broker-permanent",
        ),
        pytest.param(
            AttemptResult(error="redis: Connection refused"),
            1,
            RetryAt(1001.0, "redis: Connection refused"),
            id="broker-down",
        ),
    ],
)
def test_classifies_each_result_in_one_place(
    result: AttemptResult, attempt: int, expected: Outcome
) -> None:
    """2xx delivers; 408/429/5xx/timeouts/errors retry; other statuses and limits dead-letter."""
    outcome = classify(
        result, attempt=attempt, created_at=1000.0, now=1000.0, policy=POLICY, uniform=_upper
    )
    assert outcome == expected


def test_retry_is_dead_letter_once_age_exceeds_max_age() -> None:
    """A delivery queued long ago is dead-lettered instead of retried past max_age_s."""
    outcome = classify(
        AttemptResult(status=500),
        attempt=1,
        created_at=0.0,
        now=3600.0,
        policy=POLICY,
        uniform=_upper,
    )
    assert isinstance(outcome, DeadLetter)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("0", 0.0),
        ("120", 120.0),
        (" 5 ", 5.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 60.0),
        ("Wed, 21 Oct 2015 07:26:00 GMT", 0.0),
        # The two obsolete forms a recipient must still accept (RFC 9110 5.6.7), GMT as well.
        ("Wednesday, 21-Oct-15 07:28:00 GMT", 60.0),
        ("Wed Oct 21 07:28:00 2015", 60.0),
        ("soon", None),
        ("-5", None),
        # Digits of other scripts are not delay-seconds (ASCII DIGIT only).
        ("\u0663\u0660", None),
        ("\uff15", None),
        # Longer than int() reads, or than anything means: the longest wait, not an error.
        ("9" * 5000, RETRY_AFTER_LONGEST_S),
        ("0" * 4999 + "7", 7.0),
        ("99999999999", RETRY_AFTER_LONGEST_S),
        # Date fields too large for a C integer: unreadable, not an exception.
        ("Wed, 21 Oct 2015 99999999999999999999:00:00 GMT", None),
        ("Wed, 21 Oct 2015 07:28:00 +99999999999999999999", None),
        ("Wed, 21 Oct 99999999999999999999 07:28:00 GMT", None),
    ],
)
def test_parses_retry_after_seconds_or_http_date(
    value: str | None, expected: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retry-After is delay-seconds or an HTTP-date (RFC 9110 10.2.3); junk is ignored. On a
    host whose local time is not UTC too: every HTTP-date is GMT, the asctime form included,
    which names no zone (it used to be read as local time, five hours off in New York)."""
    now = 1445412420.0  # Wed, 21 Oct 2015 07:27:00 GMT
    assert parse_retry_after(value, now) == expected
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert parse_retry_after(value, now) == expected
    finally:
        monkeypatch.undo()
        time.tzset()


def _health_after(events: list[tuple[str, float]]) -> TargetHealth:
    """``fail``, ``ok``, or ``fail 60`` (a failure with ``Retry-After: 60``), at each time."""
    health = TargetHealth()
    for event, now in events:
        if event.startswith("fail"):
            health.failed(now, POLICY, _upper, float(event.removeprefix("fail") or 0))
        else:
            health.succeeded()
    return health


@pytest.mark.parametrize(
    ("events", "now", "in_flight", "admits", "paused_until"),
    [
        pytest.param([], 0.0, 50, True, 0.0, id="healthy-admits-any-number"),
        pytest.param([("fail", 10.0)], 10.5, 0, False, 11.0, id="paused-after-failure"),
        pytest.param([("fail", 10.0)], 11.0, 0, True, 11.0, id="probe-after-pause"),
        pytest.param([("fail", 10.0)], 11.0, 1, False, 11.0, id="one-probe-at-a-time"),
        pytest.param(
            [("fail", 10.0), ("fail", 10.2), ("fail", 10.9)],
            11.0,
            0,
            True,
            11.0,
            id="failures-in-flight-together-count-once",
        ),
        pytest.param(
            [("fail", 10.0), ("fail", 11.0)], 12.5, 0, False, 13.0, id="failed-probe-escalates"
        ),
        pytest.param([("fail 60", 10.0)], 11.0, 0, False, 70.0, id="retry-after-holds-the-pause"),
        pytest.param(
            [("fail", 10.0), ("fail 60", 10.5)],
            11.0,
            0,
            False,
            70.5,
            id="retry-after-in-flight-lengthens-the-pause",
        ),
        pytest.param([("fail 0.2", 10.0)], 11.0, 0, True, 11.0, id="a-shorter-retry-after-waits"),
        pytest.param(
            [("fail", 10.0), ("fail", 11.0), ("ok", 13.0)],
            13.0,
            9,
            True,
            0.0,
            id="success-closes-the-breaker",
        ),
    ],
)
def test_target_health_pauses_then_probes_one_at_a_time(
    events: list[tuple[str, float]], now: float, in_flight: int, admits: bool, paused_until: float
) -> None:
    """A failing target is paused for a backoff, or as long as its Retry-After asks when that
    is longer, then probed singly until it answers."""
    health = _health_after(events)
    assert health.admits(now, in_flight) is admits
    assert health.paused_until == paused_until


@pytest.mark.parametrize(
    ("result", "transient"),
    [
        (AttemptResult(status=200), False),
        (AttemptResult(status=400), False),
        (AttemptResult(status=408), True),
        (AttemptResult(status=429), True),
        (AttemptResult(status=503), True),
        (AttemptResult(error="refused"), True),
    ],
)
def test_transient_results_are_the_retryable_ones(result: AttemptResult, transient: bool) -> None:
    """is_transient() agrees with classify(): only what may succeed later is transient."""
    assert is_transient(result) is transient


SCHEDULE = RetryPolicy(
    attempts=8,
    wait_initial_s=1.0,
    wait_max_s=300.0,
    max_age_s=7200.0,
    schedule=(1.0, 10.0, 60.0, 600.0),
)


def _never(low: float, high: float) -> float:
    raise AssertionError("an explicit schedule draws no jitter")


@pytest.mark.parametrize(
    ("attempt", "retry_after", "expected"),
    [
        (1, None, RetryAt(1001.0, "HTTP 503")),
        (2, None, RetryAt(1010.0, "HTTP 503")),
        (3, None, RetryAt(1060.0, "HTTP 503")),
        (4, None, RetryAt(1600.0, "HTTP 503")),
        (5, None, RetryAt(1600.0, "HTTP 503")),  # the last wait, repeated
        (7, None, RetryAt(1600.0, "HTTP 503")),
        (8, None, DeadLetter("HTTP 503: gave up after 8 attempt(s)")),
        (2, 30.0, RetryAt(1030.0, "HTTP 503")),  # a longer Retry-After wins
        (3, 30.0, RetryAt(1060.0, "HTTP 503")),  # a shorter one does not
    ],
)
def test_retry_schedule_gives_its_waits_the_last_repeated_and_longer_retry_after_wins(
    attempt: int, retry_after: float | None, expected: Outcome
) -> None:
    """retry_schedule_s: the waits as written after each attempt, no jitter, the last one
    until attempts ends it; a target's Retry-After is honoured when it asks for longer."""
    result = AttemptResult(status=503, retry_after_s=retry_after)
    outcome = classify(
        result, attempt=attempt, created_at=1000.0, now=1000.0, policy=SCHEDULE, uniform=_never
    )
    assert outcome == expected


def test_retry_schedule_still_ends_at_max_age() -> None:
    """A scheduled wait that would pass max_age_s dead-letters the delivery."""
    outcome = classify(
        AttemptResult(status=500),
        attempt=4,
        created_at=1000.0,
        now=7700.0,
        policy=SCHEDULE,
        uniform=_never,
    )
    assert outcome == DeadLetter("HTTP 500: max_age_s (7200) would be exceeded")


@pytest.mark.parametrize(
    ("now", "held_s", "expected"),
    [
        # Created at 1000 with max_age_s 7200, failed attempt 4 (a wait of 600 s).
        (7700.0, 0.0, DeadLetter("HTTP 500: max_age_s (7200) would be exceeded")),
        # The same, after 3000 s held by the target's pacing: 3000 s of age are not counted.
        (7700.0, 3000.0, RetryAt(8300.0, "HTTP 500", 3000.0)),
        (10_700.0, 3000.0, DeadLetter("HTTP 500: max_age_s (7200) would be exceeded")),
        (1010.0, 5.0, RetryAt(1610.0, "HTTP 500", 5.0)),  # carried on with the retry
    ],
)
def test_time_held_by_pacing_is_left_out_of_the_age(
    now: float, held_s: float, expected: Outcome
) -> None:
    """Time a delivery spent held (for a token, behind its conversation) does not bring its
    dead letter closer; the retry carries the held time on to its next attempt."""
    outcome = classify(
        AttemptResult(status=500),
        attempt=4,
        created_at=1000.0,
        now=now,
        policy=SCHEDULE,
        uniform=_never,
        held_s=held_s,
    )
    assert outcome == expected


def test_retry_policy_takes_the_target_s_schedule() -> None:
    """RetryPolicy.for_target carries retry_schedule_s over; without one, the formula."""
    target = TargetConfig(name="t", url="http://x/", retry_schedule_s=(5.0, 50.0))
    assert RetryPolicy.for_target(target).schedule == (5.0, 50.0)
    assert RetryPolicy.for_target(TargetConfig(name="t", url="http://x/")).schedule == ()
