"""The writer's decision to make a lone notification wait for company
(gateway.outbox.sqlite.writer)."""

from __future__ import annotations

import pytest

from gateway.outbox.sqlite.writer import LINGER_MAX_S, linger_for


@pytest.mark.parametrize(
    ("durable_jobs", "average_gap_s", "expected"),
    [
        pytest.param(1, None, 0.0, id="no history yet: commit at once"),
        pytest.param(1, 0.010, 0.0, id="notifications rare: commit at once"),
        pytest.param(1, LINGER_MAX_S * 1.01, 0.0, id="gap just over the limit"),
        pytest.param(1, 0.001, 0.0015, id="steady 1 ms gaps: wait a little over one"),
        pytest.param(1, 0.0019, LINGER_MAX_S, id="the wait never exceeds the limit"),
        pytest.param(2, 0.001, 0.0, id="a group already shares its commit"),
        pytest.param(40, 0.0001, 0.0, id="busy: groups are large without waiting"),
        pytest.param(0, 0.001, 0.0, id="no notification in the group"),
    ],
)
def test_linger_for(durable_jobs: int, average_gap_s: float | None, expected: float) -> None:
    assert linger_for(durable_jobs, average_gap_s) == pytest.approx(expected)
