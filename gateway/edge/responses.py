"""The one place that turns errors into HTTP answers, and the access log that never leaks.

Rule: handlers raise :class:`~gateway.errors.Rejected` (or let an
:class:`~gateway.errors.OutboxError` escape); :func:`answer_for` decides the status and the
one-line ``text/plain`` reason for both listeners: the callback's (:mod:`gateway.edge.listener`) and
the admin API's (through :func:`error_middleware`). An outbox failure is a 503, so Meta retries:
never a 200 for something that is not on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.errors import MethodNotAllowed, OutboxError, Rejected

__all__ = ["ACCESS_FIELDS", "answer_for", "error_middleware", "log_access", "text"]

log = logging.getLogger("gateway.http")
access_log = logging.getLogger("gateway.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def answer_for(exc: BaseException, method: str, path: str) -> tuple[int, str]:
    """The status and reason for ``exc``, raised while answering ``method path``; logged here.

    ``path`` never carries the query string: the handshake's query holds the verify token."""
    if isinstance(exc, Rejected):
        log.info("%s %s rejected: %d %s", method, path, exc.status, exc)
        return exc.status, str(exc)
    if isinstance(exc, OutboxError):
        log.error("outbox unavailable: %s", exc)
        return 503, "outbox unavailable; retry later"
    log.error("unexpected error on %s %s", method, path, exc_info=exc)
    return 500, "internal error"


def text(status: int, reason: str) -> web.Response:
    # Bytes with an explicit charset: cheaper for aiohttp than encoding text on every answer.
    return web.Response(
        status=status, body=(reason + "\n").encode(), content_type="text/plain", charset="utf-8"
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:
        response = text(*answer_for(exc, request.method, request.path))
        if isinstance(exc, MethodNotAllowed):
            response.headers["Allow"] = "GET, POST"  # RFC 9110 15.5.6: a 405 lists what is
        return response


# The access line's values, in the order log_access() passes them: a JSON log shows each under
# this name (gateway.runtime.logs), a text log as the line.
ACCESS_FIELDS = ("remote", "method", "path", "status", "bytes", "duration_ms", "client_cn")


def log_access(
    remote: str,
    method: str,
    path: str,
    status: int,
    size: int,
    seconds: float,
    client_cn: str | None = None,
) -> None:
    """One access-log line: never headers, bodies, the query string or tokens. Its values are
    the record's arguments, named by :data:`ACCESS_FIELDS`: no ``extra=`` dict to build on every
    request (a quarter more time for the line)."""
    access_log.info(
        "%s %s %s %d %sB %.1fms %s",
        remote,
        method,
        path,
        status,
        size,
        seconds * 1000,
        client_cn or "-",
    )
