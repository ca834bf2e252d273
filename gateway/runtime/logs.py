"""Logging set-up for a serving process (the supervisor and each worker call it).

Rule: log lines never hold a notification body, a phone number, a wa_id, a name, a secret or a
token; what reaches a log is decided where the line is written (values that matter go along as
``extra=`` fields: ``delivery_id``, ``target``, ``attempt``, ``status``, ``duration_ms``,
``client_cn``, ``remote``), this only chooses the format and level.

``[log] format = "text"`` (the default) writes lines for a person at a terminal;
``"json"`` writes one JSON object per line for a log pipeline: ``timestamp`` (ISO 8601, UTC),
``level``, ``logger``, ``event`` (the line a person would read) and the fields, each a JSON
value of its own. python-json-logger does the formatting (escaping, exceptions, extra fields).
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

__all__ = ["json_formatter", "setup_logging"]

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def json_formatter() -> logging.Formatter:
    """One JSON object per record: timestamp, level, logger, event, then the extra fields."""
    return JsonFormatter(
        "{levelname}{name}{message}",
        style="{",
        rename_fields={"levelname": "level", "name": "logger", "message": "event"},
        timestamp=True,
    )


def setup_logging(level: str, format: str = "text", *, stream: TextIO | None = None) -> None:
    """Log at ``level`` and above to standard error (or ``stream``), as ``text`` or ``json``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(json_formatter() if format == "json" else logging.Formatter(_TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
