"""Graph API calls behind the WABA subscription commands: ``/{waba-id}/subscribed_apps``.

Rule: every decision is a pure function of values (what to send, what a response means, which
kind of failure it is, whether usage deserves a warning, where the next page is); :func:`call` and
:func:`call_every_page` are the only code that touches the network. :func:`call` makes exactly one
request and never retries; :func:`call_every_page` makes one such request per page of a list, at
most :data:`MAX_PAGES`, and stops at the first sign of a rate limit. Meta: once rate limited, stop
calling, because every further call extends the block (graph-api/overview/rate-limiting).

Each failure is a :class:`~gateway.errors.GraphError` with a ``reason`` (``usage``, ``auth``,
``rate_limited`` or ``failure``); the command line turns it into an exit code
(:mod:`gateway.cli.exit_codes`).

The access token is only ever placed in the ``Authorization`` header, and only sent to the
``--graph-url`` origin (a ``paging.next`` link elsewhere is refused); messages built here never
contain it, and :func:`call` redacts it should Meta echo it back.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

import aiohttp
from yarl import URL

from gateway.config.rules import host_name_problem
from gateway.errors import GraphError, GraphFailure

__all__ = [
    "MAX_PAGES",
    "Action",
    "GraphRequest",
    "UsageRecord",
    "build_request",
    "call",
    "call_every_page",
    "classify_graph_error",
    "next_page_url",
    "parse_usage_header",
    "read_usage",
    "usage_warnings",
    "validate_graph_url",
    "validate_waba_id",
]

USAGE_HEADER = "X-Business-Use-Case-Usage"
# graph-api/overview/rate-limiting: app (4), user (17), page (32), custom (613) and the WhatsApp
# Business Management business use case (80008, which counts subscribed_apps calls), and 80007,
# "The WhatsApp Business Account has reached its rate limit" (calls per hour per app and WABA,
# whatsapp/cloud-api/support/error-codes).
RATE_LIMIT_CODES = frozenset({4, 17, 32, 613, 80007, 80008})
# 190 invalid or expired token, 102 session error, 10 and 200-299 missing permission.
AUTH_CODES = frozenset({190, 102, 10, *range(200, 300)})
_FIGURES = ("call_count", "total_cputime", "total_time")
# whatsapp/webhooks/override: the alternate callback URI is at most 200 characters.
MAX_OVERRIDE_URI_CHARS = 200
_WABA_ID = re.compile(r"[0-9]{1,32}")
_API_VERSION = re.compile(r"v[0-9]{1,3}\.[0-9]{1,3}")
_LOOPBACK_NAMES = frozenset({"localhost"})
# Pages read for one list at most. A subscribed_apps page holds many apps, so a WABA needs one or
# two; each page is a call that counts towards the 200 an hour per app and WABA
# (graph-api/overview/rate-limiting), so a list that never ends must not use them all up.
MAX_PAGES = 20
_DEFAULT_PORTS = {"http": 80, "https": 443}

Action = Literal["subscribe", "list", "unsubscribe", "clear-override"]
JSONObject = dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageRecord:
    """One entry of ``X-Business-Use-Case-Usage``: figures in percent, the wait in minutes."""

    business_id: str
    type: str
    call_count: float
    total_cputime: float
    total_time: float
    estimated_time_to_regain_access: float


@dataclass(frozen=True, slots=True, kw_only=True)
class GraphRequest:
    """What to send: ``body`` is ``None`` for a request without one (which is not ``{}``)."""

    method: Literal["GET", "POST", "DELETE"]
    path: str
    body: JSONObject | None = None


def one_line(text: str) -> str:
    """``text`` with control characters and runs of whitespace folded into single spaces."""
    printable = "".join(char if char.isprintable() else " " for char in text)
    return " ".join(printable.split())


def validate_waba_id(value: str) -> str:
    """Return ``value`` when it is 1 to 32 ASCII digits, else raise :class:`GraphError` (exit 2).

    Checked before any request so a typo never reaches Meta and counts against the rate limit.
    """
    if _WABA_ID.fullmatch(value) is None:
        raise GraphError(f"WABA id {value!r}: expected 1 to 32 digits", reason="usage")
    return value


def validate_graph_url(value: str) -> str:
    """Return ``value`` without a trailing slash when it is an https:// URL, or http:// to a
    loopback host (a local test server or proxy), else raise :class:`GraphError` (exit 2).

    Plain http to anywhere else would send the access token in clear text.
    """
    try:
        parts = _split_url(value)
    except ValueError as exc:
        raise GraphError(f"--graph-url {value!r}: {exc}", reason="usage") from None
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return value.rstrip("/")
    if parts.scheme == "http" and _is_loopback(host):
        return value.rstrip("/")
    raise GraphError(
        f"--graph-url {value!r}: expected an https:// URL (http:// only to a loopback host)",
        reason="usage",
    )


def _split_url(value: str) -> SplitResult:
    """``value`` split into its parts, once it is known that a request can be made to it:
    a ValueError with the reason when its brackets, port or host name are malformed."""
    parts = urlsplit(value)  # ValueError: an IPv6 address whose '[' is not closed
    port = parts.port  # ValueError: a port that is not a number in 0..65535
    if port == 0:
        raise ValueError("port 0 cannot be connected to")
    # "graph..facebook.com" would fail only inside the request.
    problem = host_name_problem(parts.hostname or "")
    if problem is not None:
        raise ValueError(problem)
    return parts


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in _LOOPBACK_NAMES


def build_request(
    action: Action,
    waba_id: str,
    *,
    api_version: str,
    override_callback_uri: str | None = None,
    verify_token: str | None = None,
) -> GraphRequest:
    """The request for ``action`` on ``waba_id``; raises :class:`GraphError` (exit 2) on bad input.

    whatsapp/webhooks/override: a POST with ``override_callback_uri`` and ``verify_token`` sets
    the WABA's alternate callback (Meta runs the GET handshake against it with that token); a POST
    with no body subscribes without an override, which also removes any existing one.
    """
    validate_waba_id(waba_id)
    if _API_VERSION.fullmatch(api_version) is None:
        raise GraphError(
            f"--api-version {api_version!r}: expected a version like v21.0", reason="usage"
        )
    path = f"/{api_version}/{waba_id}/subscribed_apps"
    has_override = override_callback_uri is not None or verify_token is not None
    if has_override and action != "subscribe":
        raise GraphError(f"{action} takes no override", reason="usage")
    if action == "list":
        return GraphRequest(method="GET", path=path)
    if action == "unsubscribe":
        return GraphRequest(method="DELETE", path=path)
    if not has_override:
        return GraphRequest(method="POST", path=path)
    if override_callback_uri is None or not verify_token:
        raise GraphError(
            "--override-callback-uri and --verify-token must be given together",
            reason="usage",
        )
    try:
        parts = _split_url(override_callback_uri)
    except ValueError as exc:
        raise GraphError(
            f"--override-callback-uri {override_callback_uri!r}: {exc}", reason="usage"
        ) from None
    if parts.scheme != "https" or not parts.hostname:
        raise GraphError(
            f"--override-callback-uri {override_callback_uri!r}: expected an https:// URL",
            reason="usage",
        )
    if len(override_callback_uri) > MAX_OVERRIDE_URI_CHARS:
        raise GraphError(
            f"--override-callback-uri is {len(override_callback_uri)} characters long:"
            f" Meta accepts at most {MAX_OVERRIDE_URI_CHARS}",
            reason="usage",
        )
    body = {"override_callback_uri": override_callback_uri, "verify_token": verify_token}
    return GraphRequest(method="POST", path=path, body=body)


def parse_usage_header(value: str) -> list[UsageRecord]:
    """Parse ``X-Business-Use-Case-Usage``; raise :class:`ValueError` when it is malformed.

    Shape (graph-api/overview/rate-limiting): ``{"<business id>": [{"type", "call_count",
    "total_cputime", "total_time", "estimated_time_to_regain_access"}]}``.
    """
    try:
        document = json.loads(value)
    except (ValueError, RecursionError):
        # RecursionError: nested deeper than the parser goes, which no usage header is.
        raise ValueError("not JSON") from None
    if not isinstance(document, dict):
        raise ValueError("expected a JSON object keyed by business id")
    records: list[UsageRecord] = []
    for business_id, entries in document.items():
        if not isinstance(entries, list):
            raise ValueError(f"business {business_id}: expected a list of usage entries")
        for entry in entries:
            records.append(_usage_record(business_id, entry))
    return records


def _usage_record(business_id: str, entry: object) -> UsageRecord:
    if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
        raise ValueError(f"business {business_id}: expected entries with a string 'type'")
    figures: dict[str, float] = {}
    for name in (*_FIGURES, "estimated_time_to_regain_access"):
        figure = entry.get(name)
        # bool is an int subclass; true is not a percentage. NaN and Infinity are not JSON,
        # though Python's parser takes them: no figure or wait can be read from them.
        if (
            isinstance(figure, bool)
            or not isinstance(figure, int | float)
            or not math.isfinite(figure)
        ):
            raise ValueError(f"business {business_id}: {name} is not a number")
        figures[name] = figure
    return UsageRecord(business_id=business_id, type=entry["type"], **figures)


def usage_warnings(records: Sequence[UsageRecord], threshold: float = 80) -> list[str]:
    """One warning line per business and figure above ``threshold`` percent (highest type wins).

    Meta throttles at 100 on any figure, so the warning leaves room to stop before that.
    """
    highest: dict[tuple[str, str], float] = {}
    for record in records:
        for name in _FIGURES:
            figure: float = getattr(record, name)
            key = (record.business_id, name)
            if figure > threshold and figure > highest.get(key, -1):
                highest[key] = figure
    return [
        f"warning: Graph API usage for business {one_line(business_id)} at {figure:g}% ({name});"
        " throttled at 100%"
        for (business_id, name), figure in highest.items()
    ]


def read_usage(value: str | None) -> tuple[list[UsageRecord], list[str]]:
    """Records and warning lines for a header value; a malformed header is ignored with a
    warning, because usage reporting must never be the reason a command fails."""
    if value is None:
        return [], []
    try:
        records = parse_usage_header(value)
    except ValueError as exc:
        return [], [f"warning: ignoring malformed {USAGE_HEADER} header: {one_line(str(exc))}"]
    return records, usage_warnings(records)


def classify_graph_error(status: int, body: bytes, usage: Sequence[UsageRecord] = ()) -> GraphError:
    """The :class:`GraphError` for a failed response: one line, with the kind of failure it is.

    ``usage`` supplies the wait Meta estimates when the error is a rate limit.
    """
    document = _json(body)
    shape = "a non-JSON body" if document is None else "a JSON body that is not a Graph error"
    if not isinstance(document, dict) or not isinstance(document.get("error"), dict):
        phrase = _status_phrase(status)
        if status == HTTPStatus.TOO_MANY_REQUESTS:
            return GraphError(
                f"rate limit hit (HTTP {phrase}): {_wait(usage)}", reason="rate_limited"
            )
        reason: GraphFailure = "auth" if status in (401, 403) else "failure"
        return GraphError(f"Graph API answered HTTP {phrase} with {shape}", reason=reason)
    error: Mapping[str, Any] = document["error"]
    code = error.get("code")
    details = [f"code {code}"]
    if error.get("error_subcode") is not None:
        details.append(f"subcode {error['error_subcode']}")
    details.append(f"HTTP {status}")
    if error.get("fbtrace_id") is not None:
        details.append(f"fbtrace_id {error['fbtrace_id']}")
    message = one_line(str(error.get("message", "no message")))
    context = ", ".join(one_line(str(detail)) for detail in details)
    if code in RATE_LIMIT_CODES or status == HTTPStatus.TOO_MANY_REQUESTS:
        return GraphError(
            f"rate limit hit ({context}): {message}; {_wait(usage)}", reason="rate_limited"
        )
    if code in (190, 102) or status == HTTPStatus.UNAUTHORIZED:
        return GraphError(f"access token rejected ({context}): {message}", reason="auth")
    if code in AUTH_CODES or status == HTTPStatus.FORBIDDEN:
        return GraphError(f"permission denied ({context}): {message}", reason="auth")
    if error.get("is_transient") is True:
        message += "; Meta marks this transient, so retrying later may succeed"
    return GraphError(f"Graph API error ({context}): {message}", reason="failure")


def _json(body: bytes) -> object:
    """The parsed body, or ``None`` when it is not JSON (``null`` reads the same: no answer).

    Nesting deeper than the parser goes (a RecursionError, not a ValueError) is no Graph answer
    either: it is reported as a body that cannot be read, never as a traceback.
    """
    try:
        document: object = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return document


def _status_phrase(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def _wait(usage: Sequence[UsageRecord]) -> str:
    minutes = max((record.estimated_time_to_regain_access for record in usage), default=0)
    if minutes > 0:
        unit = "minute" if minutes == 1 else "minutes"
        estimate = f"Meta says access returns in about {minutes:g} {unit}"
    else:
        estimate = "Meta gives no estimate of when access returns"
    return f"{estimate}; every further call extends the block, so wait"


def redact(text: str, secret: str) -> str:
    """``text`` with every occurrence of ``secret`` replaced, for messages built from answers."""
    return text.replace(secret, "[redacted]") if secret else text


async def call(
    request: GraphRequest,
    *,
    graph_url: str,
    access_token: str,
    timeout_s: float,
    warn: Callable[[str], None],
) -> JSONObject:
    """Make ``request`` once and return the JSON object Meta answered, or raise
    :class:`GraphError`.

    Usage warnings go to ``warn`` as soon as the response arrives, so they are shown even when
    the call then fails. Does *not* retry: a retry would extend a rate-limit block.
    """
    document, _ = await _exchange(
        request.method,
        URL(graph_url + request.path),
        request.body,
        host=urlsplit(graph_url).hostname,
        access_token=access_token,
        timeout_s=timeout_s,
        warn=warn,
    )
    return document


async def call_every_page(
    request: GraphRequest,
    *,
    graph_url: str,
    access_token: str,
    timeout_s: float,
    warn: Callable[[str], None],
    max_pages: int = MAX_PAGES,
) -> JSONObject:
    """Make the list ``request``, then follow ``paging.next`` until a page has none, and return
    the first answer with the ``data`` of every page in one list and no ``paging`` (its cursors
    are only valid for a while, graph-api/results).

    graph-api/results: a list comes one page at a time, and only a page without ``next`` is the
    last (an empty page may still have one). Each page is one :func:`call`-like request with the
    same token, timeout and error handling; a rate-limit error on any page ends the command as it
    does on the first. Paging also stops, as a rate limit, when a page's usage header says the
    limit is reached: Meta says every call made while limited extends the block
    (graph-api/overview/rate-limiting). More than ``max_pages`` pages, a link back to a page
    already read or a ``next`` off the ``graph_url`` origin (:func:`next_page_url`) is a failure,
    never a partial list presented as whole. A warning repeated by every page is shown once.
    """
    host = urlsplit(graph_url).hostname
    shown: set[str] = set()

    def warn_once(line: str) -> None:
        if line not in shown:
            shown.add(line)
            warn(line)

    url = URL(graph_url + request.path)
    read = {str(url)}
    first, usage = await _exchange(
        request.method,
        url,
        request.body,
        host=host,
        access_token=access_token,
        timeout_s=timeout_s,
        warn=warn_once,
    )
    if not isinstance(first.get("data"), list):
        return first  # not a list: the caller judges the answer as it is
    items: list[Any] = list(first["data"])
    document, number = first, 1
    while (link := next_page_url(document, graph_url, page=number)) is not None:
        if str(link) in read:
            raise GraphError(
                f"Graph API paging.next on page {number} leads back to a page already read"
            )
        if _limit_reached(usage):
            raise GraphError(
                f"rate limit reached after page {number} of the list: stopped, the list is"
                f" incomplete; {_wait(usage)}",
                reason="rate_limited",
            )
        if number >= max_pages:
            raise GraphError(
                f"Graph API still had more pages after {max_pages}: stopped, the list is incomplete"
            )
        read.add(str(link))
        number += 1
        document, usage = await _exchange(
            "GET",
            link,
            None,
            host=host,
            access_token=access_token,
            timeout_s=timeout_s,
            warn=warn_once,
        )
        if not isinstance(document.get("data"), list):
            raise GraphError(f"Graph API answered page {number} of the list without a 'data' list")
        items.extend(document["data"])
    merged = {key: value for key, value in first.items() if key != "paging"}
    merged["data"] = items
    return merged


def next_page_url(document: Mapping[str, Any], graph_url: str, *, page: int = 1) -> URL | None:
    """The URL of the page after ``document`` (its ``paging.next``), ``None`` on the last page,
    or a :class:`GraphError` when the link is malformed or leaves ``graph_url``'s origin.

    The link is followed as Meta gives it (graph-api/results: "the Graph API endpoint that will
    return the next page"), but only to the scheme, host and port of ``graph_url``: the Bearer
    token goes with the request, and must never go anywhere but the Graph API the operator
    named. The message names where the link points, never the link (its query may hold a cursor
    or, from some proxies, a token).
    """
    paging = document.get("paging")
    if paging is None:
        return None
    if not isinstance(paging, dict):
        raise GraphError(f"Graph API answered page {page} with a 'paging' that is not an object")
    link = paging.get("next")
    if link is None:
        return None
    where = f"Graph API paging.next on page {page}"
    # Sent as given (cursors are percent-encoded already): it must be one printable ASCII word.
    if not isinstance(link, str) or not link or not all("!" <= char <= "~" for char in link):
        raise GraphError(f"{where} is not a URL")
    try:
        parts = _split_url(link)
    except ValueError as exc:
        raise GraphError(f"{where} is not a URL: {one_line(str(exc))}") from None
    if not parts.scheme or not parts.hostname:
        raise GraphError(f"{where} is not an absolute URL")
    base = urlsplit(graph_url)
    if parts.username is not None or parts.password is not None or _origin(parts) != _origin(base):
        raise GraphError(
            f"{where} points to {_shown_origin(parts)}, not to --graph-url {_shown_origin(base)}:"
            " not followed, since the access token goes to the Graph API only"
        )
    return URL(link, encoded=True)


def _origin(parts: SplitResult) -> tuple[str, str, int | None]:
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or ""), parts.port or _DEFAULT_PORTS.get(scheme)


def _shown_origin(parts: SplitResult) -> str:
    """``scheme://host[:port]``, without any user name or password the URL carries."""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return one_line(f"{parts.scheme}://{host}{port}")


def _redirected(status: int, location: str, host: str | None) -> str:
    """The failure line for a redirect: where it leads by scheme, host and port only (the rest
    of a location may hold a cursor or a token)."""
    try:
        parts = urlsplit(location)
        _ = parts.port  # ValueError: a port that is not a number
    except ValueError:
        where = "a redirect"
    else:
        where = (
            f"a redirect to {_shown_origin(parts)}"
            if parts.scheme and parts.hostname
            else f"a redirect to another path on {host}"
        )
    return (
        f"Graph API answered HTTP {_status_phrase(status)}, {where}, not followed: check"
        " --graph-url"
    )


def _limit_reached(usage: Sequence[UsageRecord]) -> bool:
    """Whether a usage header says the caller is limited: Meta throttles at 100% on any figure,
    and gives a wait only when access has been cut (graph-api/overview/rate-limiting)."""
    return any(
        record.estimated_time_to_regain_access > 0
        or any(getattr(record, name) >= 100 for name in _FIGURES)
        for record in usage
    )


async def _exchange(
    method: str,
    url: URL,
    body: JSONObject | None,
    *,
    host: str | None,
    access_token: str,
    timeout_s: float,
    warn: Callable[[str], None],
) -> tuple[JSONObject, list[UsageRecord]]:
    """One request: the JSON object answered and the usage header's records, or GraphError."""
    headers = {"Authorization": f"Bearer {access_token}"}
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(
                method,
                url,
                headers=headers,
                json=body,
                # Like curl, a bodyless POST carries no Content-Type (aiohttp would add one).
                skip_auto_headers=("Content-Type",) if body is None else (),
                # The Graph API answers its calls itself. A redirect (a proxy, a wrong
                # --graph-url) followed would take another server's answer for Meta's, and
                # turn a POST into a GET: it is reported instead.
                allow_redirects=False,
            ) as response,
        ):
            answer = await response.read()
            usage, warnings = read_usage(response.headers.get(USAGE_HEADER))
            status = response.status
            location = response.headers.get("Location")
    except TimeoutError:
        raise GraphError(f"no answer from {host} within {timeout_s:g} s") from None
    except aiohttp.ClientError as exc:
        reason = redact(one_line(str(exc)), access_token) or type(exc).__name__
        if isinstance(exc, aiohttp.ClientConnectionError):
            raise GraphError(f"cannot reach {host}: {reason}") from None
        raise GraphError(f"call to {host} failed: {reason}") from None
    except ValueError as exc:
        # UnicodeError is one: a host name the resolver cannot encode, should one get past
        # validate_graph_url. Still one line, never a traceback.
        reason = redact(one_line(str(exc)), access_token) or type(exc).__name__
        raise GraphError(f"cannot reach {host}: {reason}") from None
    for line in warnings:
        warn(redact(line, access_token))
    if 300 <= status < 400 and location is not None:
        raise GraphError(redact(_redirected(status, location, host), access_token))
    document = _json(answer) if 200 <= status < 300 else None
    if isinstance(document, dict) and "error" not in document:
        return document, usage
    error = classify_graph_error(status, answer, usage)
    raise GraphError(redact(str(error), access_token), reason=error.reason)
