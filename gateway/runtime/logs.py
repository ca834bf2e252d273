"""Logging set-up for a serving process (the supervisor and each worker call it).

Rule: log lines never hold a notification body, a phone number, a secret or a token; what
reaches a log is decided where the line is written, this only chooses the format and level.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["setup_logging"]


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
