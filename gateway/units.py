"""Readable magnitudes: ``10 * SECONDS``, ``3 * MiB``. Written once, used wherever a duration or
a size is a constant, so a figure reads in its unit and no module keeps its own copy."""

from __future__ import annotations

from typing import Final

__all__ = ["DAYS", "HOURS", "MINUTES", "SECONDS", "KiB", "MiB"]

SECONDS: Final = 1.0
MINUTES: Final = 60 * SECONDS
HOURS: Final = 60 * MINUTES
DAYS: Final = 24 * HOURS

KiB: Final = 1024
MiB: Final = 1024 * KiB
