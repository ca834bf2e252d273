"""gateway.edge.deadlines: deadlines of many connections on one timer, on a real event loop."""

from __future__ import annotations

import asyncio

import pytest

from gateway.edge.deadlines import Deadlines


class _Waiter:
    """Something with a deadline: notes when it was told."""

    def __init__(self, name: str, told: list[tuple[str, float]]) -> None:
        self.name = name
        self._told = told

    def expired(self) -> None:
        self._told.append((self.name, asyncio.get_running_loop().time()))


async def test_each_deadline_is_told_once_when_due_and_a_cleared_one_never() -> None:
    """Deadlines set in any order are told in the order they fall due, none early, each once;
    one cleared before it falls due is never told."""
    loop = asyncio.get_running_loop()
    told: list[tuple[str, float]] = []
    deadlines = Deadlines(loop)
    start = loop.time()
    waiters = {name: _Waiter(name, told) for name in ("late", "early", "cleared", "middle")}
    deadlines.set(waiters["late"], 0.3)
    deadlines.set(waiters["early"], 0.05)  # sooner than the timer set for "late"
    deadlines.set(waiters["cleared"], 0.1)
    deadlines.set(waiters["middle"], 0.15)
    deadlines.clear(waiters["cleared"])
    await asyncio.sleep(0.5)
    assert [name for name, _ in told] == ["early", "middle", "late"]
    for (_, at), due in zip(told, (0.05, 0.15, 0.3), strict=True):
        assert at - start >= due


async def test_a_deadline_set_again_counts_from_then() -> None:
    """Setting a connection's deadline again replaces the earlier one (the shutdown's after
    the handshake's)."""
    loop = asyncio.get_running_loop()
    told: list[tuple[str, float]] = []
    deadlines = Deadlines(loop)
    waiter = _Waiter("again", told)
    start = loop.time()
    deadlines.set(waiter, 0.05)
    deadlines.set(waiter, 0.2)
    await asyncio.sleep(0.35)
    assert len(told) == 1
    assert told[0][1] - start >= 0.2


class _Failing:
    """Something with a deadline whose ending fails."""

    def expired(self) -> None:
        raise ConnectionResetError("already gone")


async def test_a_connection_that_fails_to_end_costs_no_other_its_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A connection whose end raises is logged; the others due in the same pass are told, and
    so is one due later (the timer is set again)."""
    loop = asyncio.get_running_loop()
    told: list[tuple[str, float]] = []
    deadlines = Deadlines(loop)
    deadlines.set(_Failing(), 0.05)
    deadlines.set(_Waiter("same pass", told), 0.05)
    deadlines.set(_Waiter("later", told), 0.2)
    await asyncio.sleep(0.35)
    assert [name for name, _ in told] == ["same pass", "later"]
    assert "could not be ended" in caplog.text
