"""Meta's verification handshake against a callback URL (``waba-gateway verify-callback``).

Rule: send exactly the GET Meta sends (whatsapp/webhooks/create-webhook-endpoint):
``hub.mode=subscribe``, a random numeric ``hub.challenge`` and ``hub.verify_token``, and judge the
answer as Meta does, in :func:`judge`: verified only by status 200 with a body that *is* the
challenge, byte for byte. The verify token is never printed.
"""

from __future__ import annotations

import html
import json
import re
import secrets
import ssl
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, quote_plus

import aiohttp
from yarl import URL

from gateway.config.rules import host_name_problem
from gateway.errors import GatewayError
from gateway.onboarding.meta_client import diagnose

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Verdict",
    "callback_url",
    "describe_body",
    "judge",
    "verify",
]

DEFAULT_TIMEOUT_S = 10.0
_MAX_BODY_BYTES = 64 * 1024
_SHOWN_CHARS = 80

# A request without an answer is one of describe_failure's kinds: ``tls``, ``refused`` (nothing
# listens), ``timeout``, ``closed`` (the server hung up after the connection was made) or
# ``connection`` (anything else, a name that does not resolve for one).
Kind = Literal[
    "verified",
    "token_refused",
    "wrong_body",
    "wrong_status",
    "not_https",
    "tls",
    "refused",
    "timeout",
    "closed",
    "connection",
]
_FAILURES: dict[str, Kind] = {
    "tls": "tls",
    "refused": "refused",
    "timeout": "timeout",
    "closed": "closed",
}
_TOKEN = "hub.verify_token"  # noqa: S105 (the parameter's name, not a token)
# The value of hub.verify_token in an echoed query string, however the callback encoded it.
_TOKEN_PARAMETER = re.compile(rb"(hub\.verify_token=)[^&\s\"'<>]+")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What Meta would conclude: ``accepted`` only for ``verified``; ``message`` in plain words."""

    kind: Kind
    message: str

    @property
    def accepted(self) -> bool:
        return self.kind == "verified"


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "...")


def describe_body(body: bytes, challenge: str) -> str:
    """How ``body`` differs from the bare ``challenge`` (it is assumed to differ)."""
    text = body.decode("utf-8", "replace")
    stripped = text.strip()
    if not body:
        return "the body is empty"
    if stripped == challenge:
        extras = []
        leading = text[: len(text) - len(text.lstrip())]
        trailing = text[len(text.rstrip()) :]
        # Shortened like the body: up to 64 KiB of whitespace would not make one line.
        if leading:
            extras.append(f"leading whitespace {_shown(leading)}")
        if trailing:
            extras.append(
                "a trailing newline" if trailing == "\n" else f"trailing {_shown(trailing)}"
            )
        return f"the body is the challenge with {' and '.join(extras)}"
    if stripped in (f'"{challenge}"', f"'{challenge}'"):
        return f"the body is the challenge in quotes, {_shown(text)}: answer the bare value"
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        # RecursionError: nested deeper than the parser goes; still only a wrong body.
        document = None
    if isinstance(document, dict | list):
        kind = "object" if isinstance(document, dict) else "array"
        return f"the body is a JSON {kind}, {_shown(text)}, not the bare challenge"
    if challenge in text:
        return f"the body holds the challenge among other text: {_shown(text)}"
    return f"the body {_shown(text)} is not the challenge {challenge!r}"


def judge(status: int, body: bytes, challenge: str) -> Verdict:
    """What Meta concludes from the answer to its GET: pure, so it is table-tested."""
    if status == 200 and body == challenge.encode():
        return Verdict(
            "verified", "verified: HTTP 200 with the challenge as the body; Meta would accept it"
        )
    if status == 200:
        return Verdict(
            "wrong_body",
            f"wrong body: HTTP 200, but {describe_body(body, challenge)}. Meta compares the body "
            "with the challenge exactly and would not verify the callback",
        )
    if status in (404, 405):
        return Verdict(
            "wrong_status",
            f"unexpected status: HTTP {status}: no GET handler at this URL; check its path",
        )
    if 400 <= status < 500:
        return Verdict(
            "token_refused",
            f"verify token refused: HTTP {status}; Meta would report that the callback could not "
            "be verified. Check that the token is one of the gateway's meta.verify_tokens",
        )
    return Verdict(
        "wrong_status",
        f"unexpected status: HTTP {status}; Meta expects 200 with the challenge as the body",
    )


def callback_url(text: str) -> URL:
    """``text`` as a URL; a :class:`GatewayError` when it is not an absolute http(s) URL whose
    host name can be looked up."""
    try:
        url = URL(text)
        _ = url.port  # a port that is not a number raises ValueError
    except ValueError as exc:
        raise GatewayError(f"URL {text!r}: {exc}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise GatewayError(f"URL {text!r}: expected https://host/path")
    problem = host_name_problem(url.raw_host or "")
    if problem is not None:
        raise GatewayError(f"URL {text!r}: {problem}")
    return url


async def verify(
    url: URL,
    verify_token: str,
    *,
    context: ssl.SSLContext,
    timeout_s: float,
    sent_certificate: bool = False,
) -> Verdict:
    """Send Meta's GET to ``url`` and judge the answer. ``sent_certificate``: whether
    ``context`` presents a client certificate (for the explanation of a refusal)."""
    if url.scheme != "https":
        return Verdict("not_https", "not https: Meta only calls https:// callbacks")
    challenge = str(1_000_000_000 + secrets.randbelow(9_000_000_000))
    query = {"hub.mode": "subscribe", "hub.challenge": challenge, _TOKEN: verify_token}
    sent = url.extend_query(query)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            # Redirects are judged, not followed: the callback URL itself must answer.
            session.get(sent, ssl=context, allow_redirects=False) as response,
        ):
            body = await _read_body(response.content)
            verdict = judge(response.status, body, challenge)
            if verdict.accepted:
                return verdict
            # A callback may echo its query string: the body is shown without the token.
            return judge(response.status, _without_token(body, verify_token, sent), challenge)
    except (aiohttp.ClientError, TimeoutError, ssl.SSLError, ValueError) as exc:
        # ValueError (UnicodeError is one): a host name the resolver cannot encode, should one
        # get past callback_url; a verdict all the same, never a traceback.
        kind, message = await diagnose(
            exc, url.host or "", url.port or 443, timeout_s, sent_certificate=sent_certificate
        )
        return Verdict(_FAILURES.get(kind, "connection"), message)


async def _read_body(content: aiohttp.StreamReader) -> bytes:
    """The whole body, up to one byte past ``_MAX_BODY_BYTES`` (so a longer one still differs
    from any challenge). ``read(n)`` returns what has arrived so far, and Meta judges the whole
    body: a challenge followed by a newline in a later write is not the challenge."""
    chunks: list[bytes] = []
    size = 0
    while size <= _MAX_BODY_BYTES:
        chunk = await content.read(_MAX_BODY_BYTES + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _without_token(body: bytes, verify_token: str, sent: URL) -> bytes:
    """``body`` with every form of the token a callback may echo replaced: as sent (yarl leaves
    ``/`` alone and percent-encodes ``+`` and ``=``, unlike ``quote``), as the server decoded it,
    quoted other ways, JSON- or HTML-escaped; and any ``hub.verify_token=`` value left."""
    forms = {
        verify_token,
        quote(verify_token, safe=""),
        quote_plus(verify_token),
        json.dumps(verify_token)[1:-1],
        json.dumps(verify_token)[1:-1].replace("/", "\\/"),
        html.escape(verify_token),
    }
    for query in (sent.raw_query_string, sent.query_string):
        for pair in query.split("&"):
            name, _, value = pair.partition("=")
            if name == _TOKEN:
                forms.add(value)
    # Longest first, so that no form leaves part of a longer one behind.
    for form in sorted(filter(None, forms), key=len, reverse=True):
        body = body.replace(form.encode(), b"<verify token>")
    return _TOKEN_PARAMETER.sub(rb"\1<verify token>", body)
