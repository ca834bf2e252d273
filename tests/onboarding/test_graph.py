"""The pure Graph API decisions: usage header, warnings, error classification, request building."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.cli.exit_codes import GRAPH_EXIT_CODES
from gateway.errors import GraphError
from gateway.onboarding import graph

DATA = Path(__file__).resolve().parents[1] / "data" / "graph"
TRACE = "AXsgnV2Cm3ZMGF3dF_cfYIn"


def sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


def usage(**figures: float) -> graph.UsageRecord:
    values: dict[str, float] = {
        "call_count": 1,
        "total_cputime": 1,
        "total_time": 1,
        "estimated_time_to_regain_access": 0,
    }
    values.update(figures)
    return graph.UsageRecord(business_id="102290129340398", type="whatsapp", **values)


def error_body(code: int, message: str = "limited", **extra: Any) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": "OAuthException", "code": code, **extra}}
    ).encode()


def test_parses_meta_sample_usage_header() -> None:
    """Meta's published header sample parses into one record per business use case type."""
    records = graph.parse_usage_header(
        sample("graph-header-x-business-use-case-usage.json").decode()
    )
    assert [record.type for record in records] == ["whatsapp_business_management", "whatsapp"]
    assert records[0] == graph.UsageRecord(
        business_id="102290129340398",
        type="whatsapp_business_management",
        call_count=1,
        total_cputime=1,
        total_time=1,
        estimated_time_to_regain_access=0,
    )
    assert graph.usage_warnings(records) == []


@pytest.mark.parametrize(
    "value",
    [
        "",
        "not json",
        "[]",
        '{"1": {"type": "whatsapp"}}',
        '{"1": [1]}',
        '{"1": [{"call_count": 1, "total_cputime": 1, "total_time": 1,'
        ' "estimated_time_to_regain_access": 0}]}',
        '{"1": [{"type": "whatsapp", "call_count": 1, "total_cputime": 1, "total_time": 1}]}',
        '{"1": [{"type": "whatsapp", "call_count": "85", "total_cputime": 1, "total_time": 1,'
        ' "estimated_time_to_regain_access": 0}]}',
        '{"1": [{"type": "whatsapp", "call_count": true, "total_cputime": 1, "total_time": 1,'
        ' "estimated_time_to_regain_access": 0}]}',
        # Not JSON numbers, though Python's parser takes them: "about inf minutes" is no wait.
        '{"1": [{"type": "whatsapp", "call_count": NaN, "total_cputime": 1, "total_time": 1,'
        ' "estimated_time_to_regain_access": 0}]}',
        '{"1": [{"type": "whatsapp", "call_count": 1, "total_cputime": 1, "total_time": 1,'
        ' "estimated_time_to_regain_access": Infinity}]}',
        # Deeper than the parser goes: a RecursionError, not a ValueError.
        "[" * 5000,
    ],
)
def test_rejects_malformed_usage_header(value: str) -> None:
    """A header that does not have Meta's documented shape raises ValueError."""
    with pytest.raises(ValueError, match=r"."):
        graph.parse_usage_header(value)


def test_read_usage_ignores_malformed_header_with_a_warning() -> None:
    """A malformed header yields no records and one warning line instead of an exception."""
    records, warnings = graph.read_usage("{broken")
    assert records == []
    assert warnings == ["warning: ignoring malformed X-Business-Use-Case-Usage header: not JSON"]


def test_read_usage_without_header_reports_nothing() -> None:
    """A response without the header is normal and produces neither records nor warnings."""
    assert graph.read_usage(None) == ([], [])


@pytest.mark.parametrize(
    ("records", "threshold", "expected"),
    [
        ([usage(call_count=80)], 80, []),
        (
            [usage(call_count=85)],
            80,
            [
                "warning: Graph API usage for business 102290129340398 at 85% (call_count);"
                " throttled at 100%"
            ],
        ),
        (
            [usage(total_time=80.5)],
            80,
            [
                "warning: Graph API usage for business 102290129340398 at 80.5% (total_time);"
                " throttled at 100%"
            ],
        ),
        ([usage(total_cputime=50)], 40, ["(total_cputime)"]),
        ([usage(call_count=95, total_cputime=90)], 80, ["95% (call_count)", "90% (total_cputime)"]),
        ([usage(call_count=90), usage(call_count=99)], 80, ["99% (call_count)"]),
        ([], 80, []),
    ],
)
def test_usage_warnings_name_each_figure_over_the_threshold(
    records: list[graph.UsageRecord], threshold: float, expected: list[str]
) -> None:
    """Only figures strictly over the threshold warn, once per business and figure, at the peak."""
    warnings = graph.usage_warnings(records, threshold=threshold)
    assert len(warnings) == len(expected)
    for line, fragment in zip(warnings, expected, strict=True):
        assert fragment in line


@pytest.mark.parametrize(
    ("status", "body", "minutes", "exit_code", "message"),
    [
        (
            401,
            sample("graph-error-401-invalid-token.json"),
            0,
            3,
            f"access token rejected (code 190, subcode 463, HTTP 401, fbtrace_id {TRACE}):"
            " Invalid OAuth access token",
        ),
        (
            403,
            sample("graph-error-403-permission.json"),
            0,
            3,
            f"permission denied (code 200, subcode 1349174, HTTP 403, fbtrace_id {TRACE}): Your app"
            " doesn't have permission to subscribe to this WhatsApp Business Account",
        ),
        (
            429,
            sample("graph-error-429-rate-limit.json"),
            0,
            4,
            f"rate limit hit (code 4, subcode 2446079, HTTP 429, fbtrace_id {TRACE}): Application"
            " request limit reached; Meta gives no estimate of when access returns; every further"
            " call extends the block, so wait",
        ),
        (
            400,
            sample("graph-error-rate-limit-32-page.json"),
            1,
            4,
            "rate limit hit (code 32, HTTP 400, fbtrace_id Fz54k3GZrio): (#32) Page request limit"
            " reached; Meta says access returns in about 1 minute; every further call extends the"
            " block, so wait",
        ),
        (
            400,
            error_body(80008, "Too many calls", error_subcode=2494055, fbtrace_id="Az1"),
            12,
            4,
            "rate limit hit (code 80008, subcode 2494055, HTTP 400, fbtrace_id Az1): Too many"
            " calls; Meta says access returns in about 12 minutes; every further call extends the"
            " block, so wait",
        ),
        (
            500,
            sample("graph-error-500-transient.json"),
            0,
            1,
            f"Graph API error (code 2, HTTP 500, fbtrace_id {TRACE}): An unexpected error"
            " occurred. Please retry your request; Meta marks this transient, so retrying later"
            " may succeed",
        ),
        (400, error_body(17), 0, 4, "rate limit hit (code 17, HTTP 400)"),
        (400, error_body(613), 0, 4, "rate limit hit (code 613, HTTP 400)"),
        (400, error_body(80007), 0, 4, "rate limit hit (code 80007, HTTP 400)"),
        (400, error_body(102), 0, 3, "access token rejected (code 102, HTTP 400)"),
        (400, error_body(10), 0, 3, "permission denied (code 10, HTTP 400)"),
        (400, error_body(299), 0, 3, "permission denied (code 299, HTTP 400)"),
        (403, error_body(100), 0, 3, "permission denied (code 100, HTTP 403)"),
        (
            400,
            error_body(803, "Unknown\nWABA"),
            0,
            1,
            "Graph API error (code 803, HTTP 400): Unknown WABA",
        ),
        (
            502,
            b"<html>Bad Gateway</html>",
            0,
            1,
            "Graph API answered HTTP 502 Bad Gateway with a non-JSON body",
        ),
        (401, b"denied", 0, 3, "Graph API answered HTTP 401 Unauthorized with a non-JSON body"),
        (
            429,
            b"",
            5,
            4,
            "rate limit hit (HTTP 429 Too Many Requests): Meta says access returns in about"
            " 5 minutes",
        ),
        (
            400,
            b'{"data": []}',
            0,
            1,
            "HTTP 400 Bad Request with a JSON body that is not a Graph error",
        ),
        (599, b"?", 0, 1, "Graph API answered HTTP 599 with a non-JSON body"),
    ],
)
def test_classifies_graph_errors_into_exit_code_and_one_line(
    status: int, body: bytes, minutes: float, exit_code: int, message: str
) -> None:
    """Each failure maps to its exit code and one readable line with code, subcode and trace id."""
    error = graph.classify_graph_error(
        status, body, [usage(estimated_time_to_regain_access=minutes)]
    )
    assert isinstance(error, GraphError)
    assert GRAPH_EXIT_CODES[error.reason] == exit_code
    assert message in str(error)
    assert "\n" not in str(error)


@pytest.mark.parametrize("value", ["1", "102290129340398", "9" * 32])
def test_accepts_digit_waba_ids(value: str) -> None:
    """WABA ids of 1 to 32 ASCII digits pass unchanged."""
    assert graph.validate_waba_id(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "12a",
        "-1",
        " 123",
        "123\n",
        "1" * 33,
        # Fullwidth and Arabic-Indic digits: str.isdigit() accepts them, Meta does not.
        "\uff11\uff12\uff13",
        "\u0661\u0662",
        "../123",
        "123/subscribed_apps",
    ],
)
def test_rejects_waba_ids_that_are_not_digits(value: str) -> None:
    """Anything but 1 to 32 ASCII digits is a usage error (exit 2) that names the value."""
    with pytest.raises(GraphError) as caught:
        graph.validate_waba_id(value)
    assert caught.value.reason == "usage"
    assert repr(value) in str(caught.value)


def test_builds_override_subscription_from_meta_sample() -> None:
    """subscribe with an override POSTs exactly the body of Meta's sample request."""
    body = json.loads(sample("graph-subscribed_apps-post-request-override.json"))
    request = graph.build_request(
        "subscribe",
        "102290129340398",
        api_version="v21.0",
        override_callback_uri=body["override_callback_uri"],
        verify_token=body["verify_token"],
    )
    assert request == graph.GraphRequest(
        method="POST", path="/v21.0/102290129340398/subscribed_apps", body=body
    )


@pytest.mark.parametrize(
    ("action", "method"),
    [("subscribe", "POST"), ("list", "GET"), ("unsubscribe", "DELETE"), ("clear-override", "POST")],
)
def test_builds_bodyless_requests(action: graph.Action, method: str) -> None:
    """Without an override every action is a bodyless call on the WABA's subscribed_apps edge."""
    request = graph.build_request(action, "42", api_version="v19.0")
    assert (request.method, request.path, request.body) == (
        method,
        "/v19.0/42/subscribed_apps",
        None,
    )


@pytest.mark.parametrize(
    ("action", "uri", "token", "expected"),
    [
        ("subscribe", "https://example.com/hook", None, "must be given together"),
        ("subscribe", None, "t", "must be given together"),
        ("subscribe", "https://example.com/hook", "", "must be given together"),
        ("subscribe", "http://example.com/hook", "t", "expected an https:// URL"),
        ("subscribe", "https:///hook", "t", "expected an https:// URL"),
        ("subscribe", "https://[gw/hook", "t", "Invalid IPv6 URL"),
        ("subscribe", "https://gw.example.com:99999/hook", "t", "Port out of range"),
        ("subscribe", "https://gw..example.com/hook", "t", "'gw..example.com' cannot be looked up"),
        ("subscribe", "https://example.com/" + "a" * 181, "t", "201 characters long"),
        ("clear-override", "https://example.com/hook", "t", "clear-override takes no override"),
    ],
)
def test_rejects_bad_overrides(
    action: graph.Action, uri: str | None, token: str | None, expected: str
) -> None:
    """An incomplete, non-https, malformed or over-long override is a usage error before any
    request."""
    with pytest.raises(GraphError, match=expected) as caught:
        graph.build_request(
            action, "42", api_version="v21.0", override_callback_uri=uri, verify_token=token
        )
    assert caught.value.reason == "usage"


def test_accepts_override_of_exactly_200_characters() -> None:
    """Meta's limit is 200 characters inclusive."""
    uri = "https://example.com/" + "a" * 180
    request = graph.build_request(
        "subscribe", "42", api_version="v21.0", override_callback_uri=uri, verify_token="t"
    )
    assert request.body == {"override_callback_uri": uri, "verify_token": "t"}


@pytest.mark.parametrize("version", ["21.0", "v21", "v21.0/../..", ""])
def test_rejects_malformed_api_versions(version: str) -> None:
    """The API version becomes part of the path, so only vN.N is accepted."""
    with pytest.raises(GraphError, match="--api-version") as caught:
        graph.build_request("list", "42", api_version=version)
    assert caught.value.reason == "usage"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://graph.facebook.com", "https://graph.facebook.com"),
        ("https://proxy.example/graph/", "https://proxy.example/graph"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://[::1]:8080/", "http://[::1]:8080"),
        ("http://localhost:8080", "http://localhost:8080"),
    ],
)
def test_accepts_https_or_loopback_graph_urls(value: str, expected: str) -> None:
    """https anywhere, and plain http to this machine only, with any trailing slash removed."""
    assert graph.validate_graph_url(value) == expected


@pytest.mark.parametrize(
    "value", ["http://graph.facebook.com", "ftp://127.0.0.1", "graph.facebook.com", ""]
)
def test_rejects_graph_urls_that_would_expose_the_token(value: str) -> None:
    """Plain http to another host would send the Bearer token in clear text: exit 2."""
    with pytest.raises(GraphError, match="--graph-url") as caught:
        graph.validate_graph_url(value)
    assert caught.value.reason == "usage"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("https://[::1", "Invalid IPv6 URL"),
        ("https://graph.facebook.com:99999", "Port out of range"),
        ("https://graph.facebook.com:http", "Port could not be cast"),
        ("https://graph.facebook.com:0", "port 0"),
        ("https://graph..facebook.com", "host name 'graph..facebook.com' cannot be looked up"),
        ("https://" + "a" * 64 + ".facebook.com", "every label between dots must have 1 to 63"),
        ("http://127.0.0.1:65536", "Port out of range"),
    ],
)
def test_rejects_graph_urls_no_request_can_be_made_to(value: str, reason: str) -> None:
    """Unclosed brackets, a port outside 1..65535 or a host name with an empty or over-long
    label is a usage error naming why, not a failure of the call later."""
    with pytest.raises(GraphError, match="--graph-url") as caught:
        graph.validate_graph_url(value)
    assert caught.value.reason == "usage"
    assert reason in str(caught.value)


async def test_a_call_to_a_host_the_resolver_cannot_encode_is_one_failure_line() -> None:
    """Should such a host get past the check, the call still ends in one GraphError line."""
    request = graph.build_request("list", "42", api_version="v21.0")
    with pytest.raises(GraphError, match=r"^cannot reach graph\.\.facebook\.com: ") as caught:
        await graph.call(
            request,
            graph_url="https://graph..facebook.com",
            access_token="EAAGsecret",
            timeout_s=5,
            warn=print,
        )
    assert caught.value.reason == "failure"
    assert "\n" not in str(caught.value)


def test_redacts_every_occurrence_of_a_secret() -> None:
    """A message that echoes the token keeps its text but loses the token."""
    assert graph.redact("bad token EAAx (EAAx)", "EAAx") == "bad token [redacted] ([redacted])"


def test_warnings_stay_on_one_line_whatever_the_header_holds() -> None:
    """A business id with a newline cannot split a warning into a forged second line."""
    _, warnings = graph.read_usage(
        json.dumps(
            {
                "1\nerror: forged": [
                    {
                        "type": "whatsapp",
                        "call_count": 90,
                        "total_cputime": 1,
                        "total_time": 1,
                        "estimated_time_to_regain_access": 0,
                    }
                ]
            }
        )
    )
    assert warnings == [
        "warning: Graph API usage for business 1 error: forged at 90% (call_count);"
        " throttled at 100%"
    ]


GRAPH = "https://graph.facebook.com"
NEXT = f"{GRAPH}/v21.0/42/subscribed_apps?limit=25&after=MTAxNTExOTQ1MjAwNzI5NDE%3D"


@pytest.mark.parametrize(
    "document",
    [
        {"data": []},
        {"data": [], "paging": {"cursors": {"before": "QVFI", "after": "QVFI"}}},
        {"data": [], "paging": {"cursors": {"after": "QVFI"}, "next": None}},
    ],
)
def test_a_page_without_a_next_link_is_the_last(document: dict[str, Any]) -> None:
    """graph-api/results: without ``next`` this is the last page, cursors or not."""
    assert graph.next_page_url(document, GRAPH) is None


@pytest.mark.parametrize(
    "link",
    [
        NEXT,
        NEXT.replace(GRAPH, "https://graph.facebook.com:443"),
        NEXT.replace(GRAPH, "https://GRAPH.facebook.com"),
    ],
)
def test_a_next_link_on_the_graph_url_origin_is_followed_as_given(link: str) -> None:
    """The same scheme, host and port (443 written or not, any case) is the Graph API; the
    link's query goes out byte for byte (a cursor's ``%3D`` is not decoded)."""
    url = graph.next_page_url({"data": [], "paging": {"next": link}}, GRAPH)
    assert url is not None
    assert url.raw_query_string == "limit=25&after=MTAxNTExOTQ1MjAwNzI5NDE%3D"
    assert (url.scheme, url.host, url.port) == ("https", "graph.facebook.com", 443)


@pytest.mark.parametrize(
    ("link", "said"),
    [
        (NEXT.replace("https://", "http://"), "points to http://graph.facebook.com, not"),
        (NEXT.replace(GRAPH, "https://graph.facebook.com:8443"), "graph.facebook.com:8443"),
        (NEXT.replace(GRAPH, "https://graph.facebook.com.example"), "points to https://graph"),
        (NEXT.replace(GRAPH, "https://EAAGsecret@graph.facebook.com"), "points to https://graph"),
        (NEXT.replace(GRAPH, ""), "is not an absolute URL"),
        (NEXT + " x", "is not a URL"),
        (NEXT.replace("limit", "l\u00efmit"), "is not a URL"),
        ("", "is not a URL"),
        (42, "is not a URL"),
        (NEXT.replace(GRAPH, "https://[::1"), "is not a URL: Invalid IPv6 URL"),
    ],
)
def test_a_next_link_off_the_graph_url_origin_is_refused(link: object, said: str) -> None:
    """The token would go with the request: a link to another scheme, host or port, with
    credentials, relative or not a URL is a failure (exit 1) that does not repeat it."""
    with pytest.raises(GraphError, match=r"^Graph API paging\.next on page 3 ") as caught:
        graph.next_page_url({"data": [], "paging": {"next": link}}, GRAPH, page=3)
    assert caught.value.reason == "failure"
    assert said in str(caught.value)
    assert "MTAx" not in str(caught.value)
    assert "EAAGsecret" not in str(caught.value)


def test_paging_that_is_not_an_object_is_refused() -> None:
    """A ``paging`` of another shape cannot tell whether more pages follow: a failure."""
    with pytest.raises(GraphError, match="page 1 with a 'paging' that is not an object"):
        graph.next_page_url({"data": [], "paging": [NEXT]}, GRAPH)
