"""Logging set-up for a serving process (the supervisor and each worker call it).

Rule: log lines never hold a notification body, a phone number, a wa_id, a name, a secret or a
token; what reaches a log is decided where the line is written (values that matter go along as
``extra=`` fields: ``delivery_id``, ``target``, ``attempt``, ``status``; the access line's values,
written on every request, are its arguments, named here by
:data:`gateway.edge.responses.ACCESS_FIELDS`), this only chooses the format and level.

``[log] format = "text"`` (the default) writes lines for a person at a terminal;
``"json"`` writes one JSON object per line for a log pipeline: ``timestamp`` (ISO 8601, UTC),
``level``, ``logger``, ``event`` (the line a person would read) and the fields, each a JSON
value of its own. python-json-logger does the formatting (escaping, exceptions, extra fields).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

from gateway.edge.responses import ACCESS_FIELDS, access_log

__all__ = ["json_formatter", "setup_logging"]

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Formatter(JsonFormatter):
    """python-json-logger's formatter, which also names the access line's arguments."""

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        args = record.args
        if record.name == access_log.name and isinstance(args, tuple):
            fields = dict(zip(ACCESS_FIELDS, args, strict=False))
            duration = fields.get("duration_ms")
            if isinstance(duration, float):
                fields["duration_ms"] = round(duration, 3)
            if fields.get("client_cn") == "-":
                fields["client_cn"] = None
            log_data.update(fields)


def json_formatter() -> logging.Formatter:
    """One JSON object per record: timestamp, level, logger, event, then the extra fields."""
    return _Formatter(
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
