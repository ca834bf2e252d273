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
import re
import sys
from typing import Any, TextIO

from aiohttp.http_exceptions import BadStatusLine, HttpProcessingError, InvalidURLError
from pythonjsonlogger.json import JsonFormatter

from gateway.edge.responses import ACCESS_FIELDS, access_log

__all__ = ["json_formatter", "setup_logging", "text_formatter"]

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Every character that could end a line or move a terminal's cursor: C0 and C1 controls, DEL,
# and Unicode's line and paragraph separators.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(match: re.Match[str]) -> str:
    return repr(match.group())[1:-1]  # \n, \x1b, \u2028


class _TextFormatter(logging.Formatter):
    """One record, one line: control characters in the message are written as escapes, so a
    path, method or header value a client chose cannot start a forged line or colour a
    terminal. A traceback, which the gateway writes itself, keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        return _UNPRINTABLE.sub(_escaped, line) if not line.isprintable() else line


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


def text_formatter() -> logging.Formatter:
    """A line per record for a person at a terminal, with client-chosen text escaped."""
    return _TextFormatter(_TEXT_FORMAT)


# Where aiohttp's message starts quoting the request: llhttp's ":\n\n  b'<line>'" and the
# pure-Python parser's ": b'<line>'" or ": '<line>'".
_QUOTE_STARTS = re.compile(r""":\s*(?:\n|b?['"])""")


def _refusal(error: HttpProcessingError) -> str:
    """What the parser refused, without the request's bytes that aiohttp repeats after it: the
    offending line may be an ``Authorization`` header (a token read from a file with a
    Windows line ending ends in a CR the parser refuses) or a session cookie."""
    if isinstance(error, InvalidURLError):  # its message is the request target itself
        return "invalid request target"
    if isinstance(error, BadStatusLine) and not error.message.startswith("Received HTTPS"):
        return "bad request line"  # "Bad status line 'GET ...'": the whole line, quoted
    return _QUOTE_STARTS.split(error.message, maxsplit=1)[0]


class _MalformedRequests(logging.Filter):
    """aiohttp's server (the admin listener) logs a request it cannot parse as an error with a
    traceback; it is the client's mistake, answered 400: one line at INFO says so, with the
    parser's reason but none of the request's bytes (:func:`_refusal`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "-"
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
            record.msg, record.args = (
                "malformed request from %s refused: %s",
                (remote, _refusal(error)),
            )
            record.exc_info = record.exc_text = None
        return True


def setup_logging(level: str, format: str = "text", *, stream: TextIO | None = None) -> None:
    """Log at ``level`` and above to standard error (or ``stream``), as ``text`` or ``json``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(json_formatter() if format == "json" else text_formatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(each, _MalformedRequests) for each in server.filters):
        server.addFilter(_MalformedRequests())
