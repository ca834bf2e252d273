"""Readable magnitudes: ``10 * SECONDS``, ``3 * MiB``. Written once, used wherever a duration or
a size is a constant, so a figure reads in its unit and no module keeps its own copy."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

__all__ = [
    "DAYS",
    "HOURS",
    "MINUTES",
    "SECONDS",
    "KiB",
    "MiB",
    "decimal",
    "parse_age",
    "parse_since",
]

SECONDS: Final = 1.0
MINUTES: Final = 60 * SECONDS
HOURS: Final = 60 * MINUTES
DAYS: Final = 24 * HOURS

KiB: Final = 1024
MiB: Final = 1024 * KiB


_UNITS: Final = {"s": SECONDS, "m": MINUTES, "h": HOURS, "d": DAYS}


def decimal(text: str) -> int | None:
    """The whole number ``text`` writes in ASCII digits (at most 9 of them); ``None`` otherwise.

    Not ``str.isdigit()``: it accepts superscripts (``²``) and other digits ``int()`` refuses."""
    if not (text.isascii() and text.isdigit() and len(text) <= 9):
        return None
    return int(text)


def parse_age(text: str) -> float:
    """Seconds in ``30d``, ``12h``, ``15m``, ``90s`` (or plain seconds); raises ValueError."""
    value = text.strip().lower()
    unit = _UNITS.get(value[-1:], None)
    number = value[:-1] if unit is not None else value
    if not number.isascii() or not number.replace(".", "", 1).isdigit():
        raise ValueError(f"{text!r} is not an age like 30d, 12h, 15m or 90s")
    return float(number) * (unit or SECONDS)


def parse_since(text: str, now: float) -> float:
    """A Unix time from an age before ``now`` (``24h``) or an ISO 8601 time
    (``2026-11-30T06:00:00Z``; without a zone, UTC); raises ValueError."""
    try:
        return now - parse_age(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an age like 24h nor an ISO 8601 time like 2026-11-30T06:00Z"
        ) from None
    return (when if when.tzinfo is not None else when.replace(tzinfo=UTC)).timestamp()
