"""The admin listener's browser checks as tables: which Host it answers, which state-changing
requests come from another site (gateway.admin.origin)."""

from __future__ import annotations

import pytest

from gateway.admin.origin import cross_site_refusal, form_refusal, host_name, host_refusal

ALLOWED = frozenset({"ops.internal"})


@pytest.mark.parametrize(
    ("host", "own", "taken"),
    [
        ("127.0.0.1:8081", "127.0.0.1", True),
        ("127.0.0.2", "127.0.0.1", True),  # all of 127/8 is loopback
        ("localhost:8081", "127.0.0.1", True),
        ("LocalHost.", "127.0.0.1", True),
        ("console.localhost:8081", "127.0.0.1", True),  # RFC 6761: loopback only
        ("[::1]:8081", "::1", True),
        ("10.0.0.5:8081", "10.0.0.5", True),  # the address the connection came in on
        ("[fd00::5]:8081", "fd00::5", True),
        ("ops.internal:8081", "10.0.0.5", True),
        ("OPS.INTERNAL.", "10.0.0.5", True),
        ("10.0.0.5:8081", "::ffff:10.0.0.5", True),  # an IPv4 client of a dual-stack socket
        ("10.0.0.6:8081", "10.0.0.5", False),  # another address of the network
        ("rebound.example:8081", "127.0.0.1", False),
        ("127.0.0.1.rebound.example", "127.0.0.1", False),
        ("localhost.rebound.example", "127.0.0.1", False),
        ("ops.internal.rebound.example", "127.0.0.1", False),
        ("user@localhost", "127.0.0.1", False),
        ("localhost:port", "127.0.0.1", False),
        ("localhost/x", "127.0.0.1", False),
        ("", "127.0.0.1", False),
        (None, "127.0.0.1", False),
        ("[::1", "::1", False),
    ],
)
def test_the_admin_listener_answers_its_own_loopback_and_configured_names_only(
    host: str | None, own: str, taken: bool
) -> None:
    """DNS rebinding shows up as a Host that is none of these."""
    assert (host_refusal(host, own, ALLOWED) is None) == taken


def test_a_refused_host_is_shown_escaped() -> None:
    """The refusal is logged and answered: a control character in Host stays an escape."""
    refusal = host_refusal("evil\u2028x", "127.0.0.1", ALLOWED)
    assert refusal is not None
    assert "\u2028" not in refusal
    assert "\\u2028" in refusal


@pytest.mark.parametrize(
    ("method", "origin", "fetch_site", "taken"),
    [
        ("GET", "http://evil.example", "cross-site", True),  # reading is the Host check's
        ("HEAD", None, "cross-site", True),
        ("POST", None, None, True),  # curl, the CLI: no browser
        ("POST", None, "same-origin", True),
        ("POST", "null", "same-origin", True),  # Chromium's form under no-referrer
        ("POST", None, "none", True),
        ("POST", None, "cross-site", False),
        ("POST", None, "same-site", False),
        ("POST", None, "Cross-Site", False),
        ("POST", "http://127.0.0.1:8081", "cross-site", False),
        ("POST", "http://127.0.0.1:8081", None, True),
        ("POST", "http://LOCALHOST:8081", None, False),  # another origin than Host's
        ("POST", "http://127.0.0.1", None, False),
        ("POST", "https://127.0.0.1:8081", None, True),
        ("POST", "http://evil.example", None, False),
        ("POST", "null", None, False),
        ("POST", "http://127.0.0.1:x", None, False),
        ("PUT", "http://evil.example", None, False),
        ("DELETE", None, "cross-site", False),
    ],
)
def test_a_state_changing_request_from_another_site_is_refused(
    method: str, origin: str | None, fetch_site: str | None, taken: bool
) -> None:
    """Sec-Fetch-Site decides when a browser sends it; Origin otherwise; neither: no browser."""
    refusal = cross_site_refusal(method, "127.0.0.1:8081", origin, fetch_site)
    assert (refusal is None) == taken


def test_origin_without_a_port_in_host_is_the_schemes_default() -> None:
    """Behind a TLS proxy, Host has no port and Origin is https: the same origin."""
    assert cross_site_refusal("POST", "admin.example", "https://admin.example", None) is None
    assert cross_site_refusal("POST", "admin.example", "http://admin.example:8080", None)


@pytest.mark.parametrize(
    ("host", "name"),
    [("Example.COM.:80", "example.com"), ("[::1]:1", "::1"), ("a b", None), (":80", None)],
)
def test_host_names_are_read_as_urls_read_them(host: str, name: str | None) -> None:
    """Lower case, no root dot, no port; what is no host name is None."""
    assert host_name(host) == name


@pytest.mark.parametrize(
    ("method", "content_type", "taken"),
    [
        ("POST", None, True),  # the CLI, curl -X POST
        ("POST", "application/json", True),
        ("GET", "text/plain", True),
        ("POST", "text/plain", False),
        ("POST", "Text/Plain; charset=utf-8", False),
        ("POST", "application/x-www-form-urlencoded", False),
        ("POST", "multipart/form-data; boundary=x", False),
        ("DELETE", "text/plain", False),
    ],
)
def test_a_forms_body_is_no_request_to_the_json_api(
    method: str, content_type: str | None, taken: bool
) -> None:
    """The content types a page may send anywhere without asking are refused; others pass."""
    assert (form_refusal(method, content_type) is None) == taken
