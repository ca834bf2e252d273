"""The console's pure parts: session cookies and CSRF tokens, durations, what a body may show,
the circuit breaker's view, and the counters read back (gateway.admin.console)."""

from __future__ import annotations

import pytest
from helpers import message_body

from gateway.admin.console.facts import body_facts
from gateway.admin.console.html import age, esc
from gateway.admin.console.paths import local_redirect
from gateway.admin.console.session import SESSION_TTL_S, Sessions
from gateway.admin.console.views import Signing, _loopback
from gateway.admin.stats import Stats
from gateway.config import TargetConfig
from gateway.delivery.backoff import Breaker, RetryPolicy, TargetHealth


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_cookie_is_accepted_until_it_expires_or_is_signed_out() -> None:
    """Its own key's cookie verifies; after the TTL, after sign-out, or under another key
    (a restarted process) it does not."""
    clock = Clock()
    sessions = Sessions(b"k" * 32, clock=clock)
    cookie = sessions.issue()
    sid = sessions.verify(cookie)
    assert sid is not None
    assert Sessions(b"x" * 32, clock=clock).verify(cookie) is None
    clock.now += SESSION_TTL_S
    assert sessions.verify(cookie) is None
    clock.now -= 1
    assert sessions.verify(cookie) == sid
    sessions.end(sid)
    assert sessions.verify(cookie) is None


def test_a_signed_out_session_is_forgotten_once_its_cookie_would_have_expired() -> None:
    """Signed-out sessions are remembered only for as long as their cookies could still be
    replayed: a gateway that runs for months does not keep every sign-out, and a cookie
    signed out stays refused until it expires on its own."""
    clock = Clock()
    sessions = Sessions(b"k" * 32, clock=clock)
    cookies = []
    for _ in range(3):
        cookie = sessions.issue()
        sid = sessions.verify(cookie)
        assert sid is not None
        sessions.end(sid)
        cookies.append(cookie)
        clock.now += SESSION_TTL_S / 2
    assert all(sessions.verify(cookie) is None for cookie in cookies)
    assert len(sessions._ended) == 2  # the first expired meanwhile: forgotten
    clock.now += SESSION_TTL_S
    later = sessions.issue()
    sid = sessions.verify(later)
    assert sid is not None
    sessions.end(sid)
    assert list(sessions._ended) == [sid]


@pytest.mark.parametrize(
    "tamper",
    [
        lambda c: c + "0",
        lambda c: c.replace(".", "x", 1),
        lambda c: "other" + c[5:],
        lambda c: "",
        lambda c: "a.b.c",
        lambda c: "..",
    ],
)
def test_a_tampered_session_cookie_is_refused(tamper: object) -> None:
    """Any change to the cookie (id, time or MAC) breaks it."""
    sessions = Sessions(b"k" * 32)
    assert callable(tamper)
    assert sessions.verify(tamper(sessions.issue())) is None


def test_csrf_tokens_belong_to_one_session_and_sign_in_tokens_to_one_form() -> None:
    """A session's CSRF token fails for another session; a sign-in token needs its cookie."""
    sessions = Sessions(b"k" * 32)
    token = sessions.csrf("one")
    assert sessions.csrf_ok("one", token)
    assert not sessions.csrf_ok("two", token)
    assert not sessions.csrf_ok("one", None)
    cookie, form = sessions.presession()
    assert sessions.presession_ok(cookie, form)
    assert not sessions.presession_ok(sessions.presession()[0], form)
    assert not sessions.presession_ok(None, form)


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(None, "-"), (-3, "0s"), (42.9, "42s"), (192, "3m 12s"), (18120, "5h 02m"), (187200, "2d 4h")],
)
def test_durations_read_as_people_say_them(seconds: float | None, shown: str) -> None:
    assert age(seconds) == shown


def test_escaping_covers_markup_and_quotes() -> None:
    """Text from a target's answer cannot open a tag or leave an attribute."""
    assert esc('<script>"x"</script>') == "&lt;script&gt;&quot;x&quot;&lt;/script&gt;"


@pytest.mark.parametrize(
    ("body", "facts"),
    [
        (message_body("hello"), (["messages"], ["102290129340398"])),
        (b"not json", ([], [])),
        (b'{"entry": "odd"}', ([], [])),
        (
            b'{"entry":[{"id":"1","changes":[{"field":"a"},{"field":"b"},{"field":"a"}]},'
            b'{"id":"2","changes":[{"field":"account_update","value":{"waba_info":'
            b'{"waba_id":"3"}}}]}]}',
            (["a", "b", "account_update"], ["1", "2", "3"]),
        ),
    ],
)
def test_a_body_shows_only_its_fields_and_waba_ids(
    body: bytes, facts: tuple[list[str], list[str]]
) -> None:
    """Fields and WABA ids, each once, in order; nothing from a body that is not one."""
    assert body_facts(body) == facts


def test_breaker_reads_closed_open_then_half_open() -> None:
    """Closed with no failure; open while paused; half-open once the pause is over."""
    health = TargetHealth()
    policy = RetryPolicy.for_target(TargetConfig(name="t", url="http://127.0.0.1/"))
    assert health.breaker(0.0) == Breaker(state="closed", failures=0, paused_until=0.0)
    health.failed(10.0, policy, lambda _low, high: high)
    assert health.breaker(10.5).state == "open"
    assert health.breaker(health.paused_until).state == "half-open"
    health.succeeded()
    assert health.breaker(99.0).state == "closed"


def test_totals_read_back_what_the_counters_counted() -> None:
    """The console's numbers are the /metrics counters, and the last CN is remembered."""
    stats = Stats()
    for _ in range(3):
        stats.accepted()
    stats.duplicate()
    stats.rejected("signature")
    stats.rejected("signature")
    stats.rejected("identity")
    stats.saw_client("client.webhooks.fbclientcerts.com")
    stats.saw_client(None)
    totals = stats.totals()
    assert (totals.accepted, totals.duplicates) == (3, 1)
    assert totals.rejected == {"identity": 1, "signature": 2}
    assert totals.clients == {"(none)": 1, "client.webhooks.fbclientcerts.com": 1}
    assert totals.last_client is not None
    assert totals.last_client[0] == "client.webhooks.fbclientcerts.com"


@pytest.mark.parametrize(
    ("asked", "goes_to"),
    [
        ("/console/deliveries?state=dead", "/console/deliveries?state=dead"),
        (None, "/"),
        ("", "/"),
        ("https://elsewhere.example/", "/"),
        ("//elsewhere.example/", "/"),
        ("/\\elsewhere.example/", "/"),
        ("console", "/"),
        ("/\t/elsewhere.example/", "/"),
        ("/\n/elsewhere.example/", "/"),
        ("\t//elsewhere.example/", "/"),
        ("javascript:alert(1)", "/"),
        ("/admin/reload", "/"),
        ("/console/%2e%2e/admin/reload", "/"),
        ("/console/deliveries\r\nSet-Cookie: x=1", "/console/deliveriesSet-Cookie:%20x=1"),
        ("/console/deliveries?target=a b", "/console/deliveries?target=a%20b"),
    ],
)
def test_after_sign_in_the_console_only_goes_to_its_own_pages(
    asked: str | None, goes_to: str
) -> None:
    """The sign-in form's `next` cannot send the browser to another site, nor out of the
    console, nor put a control character into the Location header."""
    assert local_redirect(asked) == goes_to


@pytest.mark.parametrize(
    ("remote", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("10.0.0.5", False),
        ("192.168.1.2", False),
        ("::ffff:10.0.0.5", False),
        (None, False),
        ("garbage", False),
    ],
)
def test_without_a_token_only_loopback_peers_count_as_local(
    remote: str | None, loopback: bool
) -> None:
    """The console's peer check, for the case the configuration's own check cannot see."""
    assert _loopback(remote) is loopback


@pytest.mark.parametrize(
    ("made_with", "in_force", "kept"),
    [
        ("old-token", "old-token", True),
        (None, None, True),
        ("old-token", "new-token", False),
        ("old-token", None, False),
        (None, "new-token", False),
    ],
)
def test_a_rotated_admin_token_ends_every_console_session(
    made_with: str | None, in_force: str | None, kept: bool
) -> None:
    """The console's sessions are signed anew when the token in force is not the one they were
    made with, so a cookie made before the rotation no longer verifies."""
    signing = Signing(Sessions(b"k" * 32), made_with)
    cookie = signing.sessions.issue()
    assert (signing.follow(in_force).verify(cookie) is not None) is kept
    assert signing.made_with == in_force


def test_a_session_cookie_with_digits_int_refuses_is_no_session() -> None:
    """A cookie whose time is written in superscripts is refused, not a 500 (even signed)."""
    sessions = Sessions(b"k" * 32, clock=lambda: 100.0)
    payload = "sid.\u00b2"
    cookie = f"{payload}.{sessions._mac('session', payload)}"
    assert sessions.verify(cookie) is None
