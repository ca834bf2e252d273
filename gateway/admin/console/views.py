"""The console's routes on the admin app: pages, forms, sign-in, and the guard in front of them.

Rule: the console is protected like the admin API. Without ``admin.token`` it answers loopback
peers only (the configuration already refuses a non-loopback ``admin.host`` without a token);
with a token, a page needs a session made by signing in with that token. Every POST carries the
session's CSRF token, and the sign-in form its pre-session's (with a token or without); after
signing in the browser goes back only to a console path (:mod:`.paths`). Every admin response
carries :data:`SECURITY_HEADERS`: no script, no inline style, no framing, no caching.
"""

from __future__ import annotations

import contextvars
import datetime
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from urllib.parse import quote, urlencode

from aiohttp import web
from multidict import MultiDictProxy

from gateway.admin.console import pages
from gateway.admin.console.facts import certificate_facts
from gateway.admin.console.html import PREFIX, frame
from gateway.admin.console.paths import is_console_path, local_redirect
from gateway.admin.console.session import (
    PRESESSION_COOKIE,
    SESSION_COOKIE,
    Sessions,
    same_text,
)
from gateway.admin.operations import outbox_text
from gateway.admin.stats import Stats
from gateway.config import Config
from gateway.delivery.backoff import Breaker
from gateway.edge.responses import Handler
from gateway.errors import BadRequest, Forbidden, NotFound
from gateway.outbox import STATES, Outbox, State
from gateway.units import decimal

__all__ = ["SECURITY_HEADERS", "SIGNING", "STYLESHEET", "Console", "Signing", "is_console_path"]

log = logging.getLogger(__name__)

SECURITY_HEADERS: Mapping[str, str] = {
    # No script at all, styles from the console's own stylesheet only, forms back to itself.
    "Content-Security-Policy": "default-src 'none'; script-src 'none'; style-src 'self'; "
    "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
PAGE_SIZE = 50
# The session of the request being answered, set by the guard (each request is its own task).
_SID: contextvars.ContextVar[str | None] = contextvars.ContextVar("console_session", default=None)
_OPEN = frozenset({f"{PREFIX}/sign-in", f"{PREFIX}/static/console.css"})


def _loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _cookie(response: web.StreamResponse, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(name, value, path="/", httponly=True, samesite="Strict", max_age=max_age)


@dataclass(slots=True)
class Signing:
    """The console's sessions and the ``admin.token`` they were made with. A reload that
    rotates the token gets a new signing key: cookies made before no longer verify."""

    sessions: Sessions
    made_with: str | None

    def follow(self, token: str | None) -> Sessions:
        """The sessions for ``token``, the one in force."""
        if token != self.made_with:
            self.made_with = token
            self.sessions = Sessions()
        return self.sessions


# The console's state, kept on the admin app it is mounted on.
SIGNING = web.AppKey("waba_gateway_console_signing", Signing)
STYLESHEET = web.AppKey("waba_gateway_console_stylesheet", bytes)


class Console:
    """The console's routes, one method each, and the guard in front of them.

    ``current`` gives the configuration in force: a reload that rotates ``admin.token`` applies
    to the console at once and ends every session made with the old one. ``refuse`` holds and
    counts a wrong token before its answer; ``accepted`` forgets the address's failures.
    """

    def __init__(
        self,
        current: Callable[[], Config],
        outbox: Outbox,
        stats: Stats,
        *,
        breakers: Callable[[], Mapping[str, Breaker]],
        wake: Callable[[], None],
        replayed: Callable[[str | None], None],
        refuse: Callable[[web.Request], Awaitable[None]],
        accepted: Callable[[web.Request], None],
    ) -> None:
        self._current = current
        self._outbox = outbox
        self._stats = stats
        self._breakers = breakers
        self._wake = wake
        self._replayed = replayed
        self._refuse = refuse
        self._accepted = accepted

    def mount(self, app: web.Application) -> None:
        """Add the console to the admin ``app``, whose middlewares must let console paths
        through to the guard added here."""
        app[SIGNING] = Signing(Sessions(), self._current().admin.token)
        stylesheet = resources.files(__package__).joinpath("static/console.css")
        app[STYLESHEET] = stylesheet.read_bytes()
        app.middlewares.append(self.guard)
        app.on_response_prepare.append(_add_headers)
        app.add_routes(
            [
                web.get("/", self.overview),
                web.get(f"{PREFIX}/static/console.css", self.stylesheet),
                web.get(f"{PREFIX}/sign-in", self.sign_in_form),
                web.post(f"{PREFIX}/sign-in", self.sign_in),
                web.post(f"{PREFIX}/sign-out", self.sign_out),
                web.get(f"{PREFIX}/deliveries", self.deliveries),
                web.get(f"{PREFIX}/deliveries/{{id}}", self.delivery),
                web.post(f"{PREFIX}/deliveries/{{id}}/replay", self.replay),
                web.get(f"{PREFIX}/targets/{{target}}/replay-dead", self.confirm_replay_dead),
                web.post(f"{PREFIX}/targets/{{target}}/replay-dead", self.replay_dead),
                web.get(f"{PREFIX}/certificates", self.certificates),
            ]
        )

    def _sessions(self, request: web.Request) -> Sessions:
        return request.app[SIGNING].follow(self._current().admin.token)

    def _page(self, request: web.Request, title: str, body: str, status: int = 200) -> web.Response:
        sid = _SID.get()
        html = frame(
            title,
            body,
            path=request.path,
            csrf=None if sid is None else self._sessions(request).csrf(sid),
            sign_out=self._current().admin.token is not None,
        )
        return web.Response(status=status, text=html, content_type="text/html", charset="utf-8")

    def _sign_in_page(
        self, request: web.Request, next_path: str, problem: str | None, status: int
    ) -> web.Response:
        cookie, form_token = self._sessions(request).presession()
        body = pages.sign_in(form_token, next_path, problem)
        response = self._page(request, "Sign in", body, status)
        _cookie(response, PRESESSION_COOKIE, cookie, 600)
        return response

    @web.middleware
    async def guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Console paths only: loopback or a session, and every POST's CSRF token."""
        if not is_console_path(request.path):
            return await handler(request)
        # Requests on one keep-alive connection share a task, and so its context: start each
        # without a session, and leave none behind.
        reset = _SID.set(None)
        try:
            return await self._checked(request, handler)
        finally:
            _SID.reset(reset)

    async def _checked(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        token = self._current().admin.token
        signer = self._sessions(request)
        if token is None and not _loopback(request.remote):
            raise Forbidden("the console answers loopback clients only without admin.token")
        if request.path in _OPEN:
            return await handler(request)
        sid = signer.verify(request.cookies.get(SESSION_COOKIE))
        fresh = None
        if sid is None and token is None:
            fresh = signer.issue()  # loopback without a token: a session only for CSRF tokens
            sid = signer.verify(fresh)
        if sid is None:
            if request.method == "GET":
                return self._sign_in_page(request, local_redirect(request.path_qs), None, 401)
            raise Forbidden("sign in first")
        _SID.set(sid)
        if request.method == "POST":
            presented = (await _form(request)).get("csrf")
            if not signer.csrf_ok(sid, presented if isinstance(presented, str) else None):
                raise Forbidden("missing or wrong CSRF token; reload the page and try again")
        response = await handler(request)
        if fresh is not None:
            _cookie(response, SESSION_COOKIE, fresh, None)
        return response

    async def stylesheet(self, request: web.Request) -> web.Response:
        body = request.app[STYLESHEET]
        return web.Response(body=body, content_type="text/css", charset="utf-8")

    async def sign_in_form(self, request: web.Request) -> web.Response:
        return self._sign_in_page(request, local_redirect(request.query.get("next")), None, 200)

    async def sign_in(self, request: web.Request) -> web.Response:
        form = await _form(request)
        next_path = local_redirect(str(form.get("next", "/")))
        token = self._current().admin.token
        signer = self._sessions(request)
        # The form's token even without admin.token: the answer is a redirect, and no other
        # site may make the browser take it.
        presented_csrf = form.get("csrf")
        if not signer.presession_ok(
            request.cookies.get(PRESESSION_COOKIE),
            presented_csrf if isinstance(presented_csrf, str) else None,
        ):
            return self._sign_in_page(request, next_path, "The form expired; try again.", 403)
        if token is None:
            return _see_other(next_path)
        presented = form.get("token")
        if not isinstance(presented, str) or not same_text(presented, token):
            log.warning("console sign-in refused from %s: wrong admin token", request.remote)
            await self._refuse(request)
            return self._sign_in_page(request, next_path, "That is not the admin token.", 401)
        self._accepted(request)
        response = _see_other(next_path)
        _cookie(response, SESSION_COOKIE, signer.issue(), None)
        response.del_cookie(PRESESSION_COOKIE, path="/")
        return response

    async def sign_out(self, request: web.Request) -> web.Response:
        self._sessions(request).end(_session())
        response = _see_other(f"{PREFIX}/sign-in")
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    async def overview(self, request: web.Request) -> web.Response:
        targets = self._current().targets
        outbox = self._outbox
        ordered = [t.name for t in targets if t.order == "conversation"]
        held = await outbox.held_back(ordered) if ordered else {}
        paces = {
            t.name: pages.Pace(
                order=t.order,
                rate_per_s=t.rate_per_s,
                burst=t.burst_size,
                held_back=held.get(t.name, 0),
            )
            for t in targets
        }
        body = pages.overview(
            self._stats.totals(),
            await outbox.counts(),
            await outbox.backlog(),
            [t.name for t in targets],
            self._breakers(),
            time.time(),
            paces,
        )
        return self._page(request, "Overview", body)

    async def deliveries(self, request: web.Request) -> web.Response:
        state, target, number = _listing_query(request.query)
        found = await self._outbox.query(
            state=state, target=target, limit=PAGE_SIZE + 1, offset=(number - 1) * PAGE_SIZE
        )
        listing = pages.Listing(
            found=found[:PAGE_SIZE],
            state=state,
            target=target,
            page=number,
            more=len(found) > PAGE_SIZE,
        )
        names = [t.name for t in self._current().targets]
        body = pages.deliveries(listing, names, time.time())
        return self._page(request, "Deliveries", body)

    async def delivery(self, request: web.Request) -> web.Response:
        delivery_id = request.match_info["id"]
        found = await self._outbox.get(delivery_id)
        if found is None:
            raise NotFound(f"no delivery {delivery_id!r}")
        attempts = await self._outbox.attempts(delivery_id)
        csrf = self._sessions(request).csrf(_session())
        body = pages.delivery(found, attempts, csrf, time.time())
        return self._page(request, f"Delivery {delivery_id}", body)

    async def replay(self, request: web.Request) -> web.Response:
        delivery_id = request.match_info["id"]
        if not await self._outbox.replay(delivery_id, time.time()):
            raise NotFound(f"no delivery {delivery_id!r}")
        self._replayed(delivery_id)
        log.info("console: delivery %s replayed", delivery_id)
        return _see_other(f"{PREFIX}/deliveries/{quote(delivery_id)}")

    async def confirm_replay_dead(self, request: web.Request) -> web.Response:
        name = outbox_text("target", request.match_info["target"])
        dead = next((b.dead for b in await self._outbox.backlog() if b.target == name), 0)
        csrf = self._sessions(request).csrf(_session())
        body = pages.confirm_replay_dead(name, dead, csrf)
        return self._page(request, f"Replay dead letters of {name}", body)

    async def replay_dead(self, request: web.Request) -> web.Response:
        name = outbox_text("target", request.match_info["target"])
        count = await self._outbox.replay_many(
            state="dead", target=name, since=None, now=time.time()
        )
        self._wake()
        log.info("console: %d dead letters of target %s replayed", count, name)
        return _see_other(f"{PREFIX}/deliveries?{urlencode({'target': name})}")

    async def certificates(self, request: web.Request) -> web.Response:
        now = datetime.datetime.now(datetime.UTC)
        facts = certificate_facts(self._current().tls, now)
        return self._page(request, "Certificates", pages.certificates(facts))


async def _add_headers(_: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)


def _session() -> str:
    sid = _SID.get()
    assert sid is not None, "the guard sets the session of every guarded request"
    return sid


def _listing_query(query: Mapping[str, str]) -> tuple[State | None, str | None, int]:
    """The deliveries page's filter: ``state`` and ``target`` (empty: any) and ``page``."""
    raw_state = query.get("state") or None
    state = next((known for known in STATES if known == raw_state), None)
    if raw_state is not None and state is None:
        raise BadRequest(f"state must be one of {', '.join(STATES)}")
    number = decimal(query.get("page", "1"))
    if number is None or not 1 <= number <= 100_000:
        raise BadRequest("page must be an integer from 1")
    return state, outbox_text("target", query.get("target") or None), number


async def _form(request: web.Request) -> MultiDictProxy[str | bytes | bytearray | web.FileField]:
    """The request's form, or BadRequest: aiohttp raises ValueError (UnicodeDecodeError among
    them) or LookupError for a body it cannot read (multipart without its boundary, a charset
    Python does not know), which would otherwise be a 500 with a traceback, for anyone who can
    reach the port, before sign-in."""
    try:
        return await request.post()
    except (ValueError, LookupError) as exc:
        raise BadRequest(f"the form could not be read ({type(exc).__name__})") from None
