"""The console's paths: which ones it guards, and where signing in may send the browser back to.

Rule: a redirect target is parsed as a browser would parse it, and only a path of the console on
this listener comes out, re-encoded; anything else goes to the overview. Browsers drop tabs and
newlines from URLs and read ``\\`` as ``/``, so ``/<TAB>/evil.example`` and ``/\\evil.example``
are ``//evil.example``, another host: matching prefixes of the raw text lets them through,
parsing does not. Re-encoding leaves no control character for the ``Location`` header.
"""

from __future__ import annotations

from urllib.parse import quote, unquote, urlsplit, urlunsplit

from gateway.admin.console.html import PREFIX

__all__ = ["is_console_path", "local_redirect"]

OVERVIEW = "/"
# What stays as it is in a path and a query; everything else is percent-encoded (RFC 3986 3.3).
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"


def is_console_path(path: str) -> bool:
    """Whether the console (rather than the bearer-token API) guards ``path``."""
    return path == OVERVIEW or path.startswith(f"{PREFIX}/")


def local_redirect(value: str | None) -> str:
    """Where to send the browser for ``value`` (the ``next`` of the sign-in form): a console
    path with its query on this listener, or the overview."""
    if not value:
        return OVERVIEW
    # urlsplit removes tabs and newlines as browsers do (WHATWG URL); backslashes it does not.
    parts = urlsplit(value.replace("\\", "/"))
    if parts.scheme or parts.netloc or not parts.path.startswith("/"):
        return OVERVIEW
    if any(segment in (".", "..") for segment in unquote(parts.path).split("/")):
        return OVERVIEW  # the browser would resolve it to a path outside the console
    path = quote(parts.path, safe=_PATH_SAFE)
    if path.startswith("//") or not is_console_path(path):
        return OVERVIEW
    return urlunsplit(("", "", path, quote(parts.query, safe=_QUERY_SAFE), ""))
