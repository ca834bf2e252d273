"""The one place that turns errors into HTTP responses, and the access log that never leaks.

Rule: handlers raise :class:`~gateway.errors.Rejected` (or let an
:class:`~gateway.errors.OutboxError` escape); :func:`error_middleware` answers with the status the
error carries and its message as a one-line ``text/plain`` reason. An outbox failure is a 503, so
Meta retries: never a 200 for something that is not on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from gateway.errors import OutboxError, Rejected

__all__ = ["AccessLogger", "error_middleware", "text"]

log = logging.getLogger("gateway.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def text(status: int, reason: str) -> web.Response:
    # Bytes with an explicit charset: cheaper for aiohttp than encoding text on every answer.
    return web.Response(
        status=status, body=(reason + "\n").encode(), content_type="text/plain", charset="utf-8"
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Rejected as exc:
        log.info("%s %s rejected: %d %s", request.method, request.path, exc.status, exc)
        return text(exc.status, str(exc))
    except OutboxError as exc:
        log.error("outbox unavailable: %s", exc)
        return text(503, "outbox unavailable; retry later")
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return text(500, "internal error")


class AccessLogger(AbstractAccessLogger):
    """Method, path without the query string (the handshake's query holds the verify token),
    status, size and time: never headers, bodies or tokens."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %d %sB %.1fms",
            request.remote,
            request.method,
            request.path,
            response.status,
            response.body_length,
            time * 1000,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
