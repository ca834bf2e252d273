"""Console sessions and CSRF tokens: signed values, no server-side store.

Rule: a session is a cookie ``<id>.<issued>.<mac>`` with an HMAC-SHA256 under a key made at
random when the process starts (a restart signs everyone out, which is the safe direction). The
cookie is HttpOnly and SameSite=Strict, so scripts cannot read it and other sites cannot make
the browser send it. Every state-changing form carries a CSRF token derived from the session id
under the same key (OWASP's "synchronizer token", stateless form), checked with
:func:`hmac.compare_digest`. The sign-in form, before any session exists, is protected the same
way by a short-lived pre-session cookie it is bound to (double submit, signed).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

__all__ = ["PRESESSION_COOKIE", "SESSION_COOKIE", "SESSION_TTL_S", "Sessions", "same_text"]

SESSION_COOKIE = "waba_console"
PRESESSION_COOKIE = "waba_console_sign_in"
SESSION_TTL_S = 8 * 3600.0


class Sessions:
    """Issues and checks session cookies and CSRF tokens; ``clock`` is injected for tests."""

    def __init__(self, key: bytes | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self._key = key or secrets.token_bytes(32)
        self._clock = clock
        # Signed out before their time, each until its cookie would have expired anyway: kept
        # no longer, or every sign-out of a long-running gateway would stay in memory.
        self._ended: dict[str, float] = {}

    def _mac(self, purpose: str, value: str) -> str:
        # surrogateescape: a cookie's undecodable bytes come back as they were sent.
        message = f"{purpose}:{value}".encode("utf-8", "surrogateescape")
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def issue(self) -> str:
        """A new session cookie value."""
        sid = secrets.token_urlsafe(16)
        payload = f"{sid}.{int(self._clock())}"
        return f"{payload}.{self._mac('session', payload)}"

    def verify(self, cookie: str | None) -> str | None:
        """The session id of a valid, unexpired, not signed-out cookie; ``None`` otherwise."""
        if not cookie:
            return None
        payload, _, mac = cookie.rpartition(".")
        sid, _, issued = payload.partition(".")
        # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
        if not (sid and issued.isascii() and issued.isdigit() and mac):
            return None
        if not same_text(mac, self._mac("session", payload)):
            return None
        if not 0 <= self._clock() - int(issued) < SESSION_TTL_S or sid in self._ended:
            return None
        return sid

    def end(self, sid: str) -> None:
        """Sign a session out: its cookie is refused from now on, even if replayed (until it
        expires, when it is refused anyway, and forgotten)."""
        now = self._clock()
        for gone in [ended for ended, until in self._ended.items() if until <= now]:
            del self._ended[gone]
        self._ended[sid] = now + SESSION_TTL_S  # issued no later than now

    def csrf(self, sid: str) -> str:
        """The CSRF token of session ``sid``."""
        return self._mac("csrf", sid)

    def csrf_ok(self, sid: str, presented: str | None) -> bool:
        return presented is not None and same_text(presented, self.csrf(sid))

    def presession(self) -> tuple[str, str]:
        """``(cookie value, form token)`` for a sign-in form."""
        nonce = secrets.token_urlsafe(16)
        return nonce, self._mac("sign-in", nonce)

    def presession_ok(self, cookie: str | None, presented: str | None) -> bool:
        if not cookie or presented is None:
            return False
        return same_text(presented, self._mac("sign-in", cookie))


def same_text(presented: str, expected: str) -> bool:
    """Whether ``presented`` (from a request: a header, a cookie, a form field) is ``expected``,
    in constant time. Compared as bytes, ``presented`` as received (aiohttp keeps a byte it
    cannot decode as a surrogate): ``hmac.compare_digest`` raises TypeError for a str with a
    character outside ASCII, which anyone may send."""
    return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), expected.encode())
