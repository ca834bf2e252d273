"""Which requests the admin listener takes from a browser: the ``Host`` it is called by, and
whether a state-changing request comes from another site.

Rule: two pure decisions, each returning ``None`` (take the request) or the reason to refuse it.

- :func:`host_refusal`: the ``Host`` header must name the listener itself (the address the
  connection came in on), a loopback name or address, or one of the names it is given
  (``admin.allowed_hosts`` and ``admin.host``). A page
  that rebinds its own name to 127.0.0.1 (DNS rebinding) reaches the listener with its own name
  in ``Host``, so it is refused before it can read a page or a CSRF token.
- :func:`cross_site_refusal`: a request that may change something (any method but GET, HEAD and
  OPTIONS) is refused when the browser says it comes from elsewhere: ``Sec-Fetch-Site`` other
  than ``same-origin`` or ``none`` (typed by the user); from a browser too old to send that, an
  ``Origin`` that is not this listener's (``null`` included: sandboxed frames and cross-site
  redirects send it). This holds
  with a token as without one: a session cookie or a token held by a browser must not be usable
  from another site (OWASP CSRF cheat sheet, "Fetch Metadata headers" and "Verifying Origin").

- :func:`form_refusal`: the JSON API takes no body at all, so a state-changing request to it
  that carries a form's content type can only be a page's doing (a browser too old to send
  either header above still sends that).

Not checked: requests with neither header, which no browser sends for a cross-site POST since
2020 (curl, the CLI and Prometheus send neither; the token guards them), and the port in
``Host`` (a rebinding page has to use the listener's port to reach it at all).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection
from urllib.parse import urlsplit

__all__ = [
    "SAFE_METHODS",
    "cross_site_refusal",
    "form_refusal",
    "host_name",
    "host_refusal",
    "printable",
]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_SAME = frozenset({"same-origin", "none"})
# The content types a page may send to another origin without asking it first (Fetch standard,
# "CORS-safelisted request-header"): the only bodies a cross-site form or fetch can carry.
_FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"})
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
_SHOWN_CHARS = 100
# What a DNS name or an IP address is made of (the colons of IPv6 included).
_NAME = re.compile(r"[a-z0-9._:-]+")


def printable(value: str) -> str:
    """``value`` quoted, with control characters escaped and shortened: how a refusal shows a
    header a client chose."""
    shown = value if len(value) <= _SHOWN_CHARS else value[:_SHOWN_CHARS] + "..."
    return repr(shown)


def host_name(host: str) -> str | None:
    """The name or address in a ``Host`` value (``name``, ``name:port``, ``[v6]:port``),
    lower case, without a trailing dot; ``None`` if it is not one."""
    try:
        parts = urlsplit(f"//{host}")
        name = parts.hostname
        _ = parts.port  # a port that is not a number makes this no Host at all
    except ValueError:
        return None
    if not name or parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    name = name.rstrip(".").lower()
    return name if name and _NAME.fullmatch(name) else None


def _loopback(name: str) -> bool:
    if name in _LOOPBACK_NAMES or name.endswith(".localhost"):
        return True  # RFC 6761 6.3: localhost names resolve to loopback only
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(text)
    # A dual-stack socket ("::") sees IPv4 clients as ::ffff:a.b.c.d.
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return mapped or address


def _same_address(name: str, own: str | None) -> bool:
    if own is None:
        return False
    try:
        return _address(name) == _address(own.partition("%")[0])
    except ValueError:
        return False


def host_refusal(host: str | None, own_address: str | None, allowed: Collection[str]) -> str | None:
    """Why a request with ``Host: host``, arriving on ``own_address``, is not for this
    listener; ``None`` if it is. ``allowed``: ``admin.allowed_hosts``, lower case."""
    if host is None:
        return "a Host header is required"
    name = host_name(host)
    if name is None:
        return f"Host {printable(host)} is not a host name"
    if _loopback(name) or _same_address(name, own_address) or name in allowed:
        return None
    return (
        f"Host {printable(host)} is not this admin listener's; "
        "add the name to admin.allowed_hosts to reach it by that name"
    )


def cross_site_refusal(
    method: str, host: str | None, origin: str | None, fetch_site: str | None
) -> str | None:
    """Why a ``method`` request with these ``Origin`` and ``Sec-Fetch-Site`` headers, sent to
    ``Host: host``, comes from another site; ``None`` if it may be taken."""
    if method in SAFE_METHODS:
        return None
    if fetch_site is not None:
        # The browser's own word, and the only one for the console's forms: under
        # Referrer-Policy: no-referrer, Chromium sends them with Origin: null.
        if fetch_site.strip().lower() in _SAME:
            return None
        return f"a {printable(fetch_site)} request may not change anything here"
    if origin is not None and not _same_origin(origin, host):
        return f"a request from origin {printable(origin)} may not change anything here"
    return None


def _same_origin(origin: str, host: str | None) -> bool:
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname or host is None:
        return False
    default = 443 if parts.scheme == "https" else 80
    ours = host_name(host)
    try:
        # No port in Host: the scheme's own, as the browser that sent Origin assumed.
        our_port = urlsplit(f"//{host}").port or default
    except ValueError:
        return False
    return ours == parts.hostname.rstrip(".").lower() and (port or default) == our_port


def form_refusal(method: str, content_type: str | None) -> str | None:
    """Why a ``method`` request to the JSON API with this ``Content-Type`` looks like a form
    another page submitted; ``None`` if it does not."""
    if method in SAFE_METHODS or content_type is None:
        return None
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type not in _FORM_TYPES:
        return None
    return (
        f"the admin API takes no {printable(media_type)} body: send the request without one "
        "(curl -X POST URL)"
    )
