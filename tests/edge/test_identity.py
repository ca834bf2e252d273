"""gateway.edge.identity: table-driven over getpeercert() dicts, no sockets, no event loop."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import pytest

from gateway.config import META_CLIENT_CN, ClientAuth
from gateway.edge.identity import check_client_identity, peer_common_names
from gateway.errors import IdentityRejected

NEXT_CN = "client.webhooks.next.example"
META = (META_CLIENT_CN,)


def peercert(*subject: tuple[tuple[str, str], ...], **extra: Any) -> dict[str, Any]:
    """A getpeercert() dict with the given subject RDNs."""
    return {"subject": subject, "issuer": ((("commonName", "Some CA"),),), **extra}


def cn(value: str) -> tuple[tuple[str, str], ...]:
    return (("commonName", value),)


ORG = (("organizationName", "Meta Platforms, Inc."),)


@pytest.mark.parametrize(
    ("cert", "expected"),
    [
        pytest.param(None, (), id="no-certificate"),
        pytest.param({}, (), id="cert-none-empty-dict"),
        pytest.param(peercert(ORG), (), id="subject-without-cn"),
        pytest.param(peercert(ORG, cn(META_CLIENT_CN)), (META_CLIENT_CN,), id="one-cn"),
        pytest.param(peercert(cn("a"), ORG, cn("b")), ("a", "b"), id="two-cns-in-order"),
        pytest.param(
            peercert((("organizationName", "o"), ("commonName", "a"))),
            ("a",),
            id="cn-in-multi-valued-rdn",
        ),
        pytest.param({"issuer": ((("commonName", "Some CA"),),)}, (), id="issuer-cn-ignored"),
    ],
)
def test_reads_subject_common_names(
    cert: Mapping[str, Any] | None, expected: tuple[str, ...]
) -> None:
    """Subject CNs come back in order; issuer and other attributes are ignored."""
    assert peer_common_names(cert) == expected


@pytest.mark.parametrize(
    ("cert", "allowed", "client_auth", "expected"),
    [
        pytest.param(
            peercert(ORG, cn(META_CLIENT_CN)), META, "required", META_CLIENT_CN, id="meta"
        ),
        pytest.param(
            peercert(cn(NEXT_CN)), (META_CLIENT_CN, NEXT_CN), "required", NEXT_CN, id="rotation"
        ),
        pytest.param(
            peercert(cn(META_CLIENT_CN)), META, "optional", META_CLIENT_CN, id="optional-with-cert"
        ),
        pytest.param(
            peercert(cn(META_CLIENT_CN)), META, "off", META_CLIENT_CN, id="off-but-cert-presented"
        ),
        pytest.param(None, META, "optional", None, id="optional-without-cert"),
        pytest.param({}, META, "off", None, id="off-cert-none-empty-dict"),
    ],
)
def test_accepts_allowed_cn_or_absent_optional_certificate(
    cert: Mapping[str, Any] | None,
    allowed: tuple[str, ...],
    client_auth: ClientAuth,
    expected: str | None,
) -> None:
    """The accepted CN is returned; no certificate where none is required gives None."""
    assert check_client_identity(cert, allowed, client_auth) == expected


@pytest.mark.parametrize(
    ("cert", "client_auth", "message"),
    [
        pytest.param(
            peercert(cn("evil.example.com")),
            "required",
            "client certificate CN 'evil.example.com' is not accepted",
            id="wrong-cn",
        ),
        pytest.param(
            peercert(cn(META_CLIENT_CN.upper())),
            "required",
            "is not accepted",
            id="case-differs",
        ),
        pytest.param(
            peercert(cn(META_CLIENT_CN + ".")), "required", "is not accepted", id="trailing-dot"
        ),
        pytest.param(
            peercert(cn(META_CLIENT_CN + ".evil.example.com")),
            "required",
            "is not accepted",
            id="meta-cn-as-prefix",
        ),
        pytest.param(
            peercert(cn("webhooks.fbclientcerts.com")), "required", "is not accepted", id="suffix"
        ),
        pytest.param(
            peercert(cn(META_CLIENT_CN), cn(META_CLIENT_CN)),
            "required",
            "has 2 subject CNs: not accepted",
            id="two-cns-both-meta",
        ),
        pytest.param(
            peercert(cn(META_CLIENT_CN), cn("evil.example.com")),
            "required",
            "has 2 subject CNs: not accepted",
            id="two-cns-one-meta",
        ),
        pytest.param(peercert(ORG), "required", "has no subject CN", id="no-cn"),
        pytest.param(
            peercert(cn("evil.example.com"), subjectAltName=(("DNS", META_CLIENT_CN),)),
            "required",
            "'evil.example.com' is not accepted",
            id="san-names-meta",
        ),
        pytest.param(
            {"subject": (ORG,), "issuer": (cn(META_CLIENT_CN),)},
            "required",
            "has no subject CN",
            id="issuer-cn-is-meta",
        ),
        pytest.param(
            peercert(cn("evil.example.com")),
            "optional",
            "'evil.example.com' is not accepted",
            id="optional-wrong-cn",
        ),
        pytest.param(None, "required", "none was presented", id="required-without-cert"),
        pytest.param({}, "required", "none was presented", id="required-empty-dict"),
    ],
)
def test_rejects_certificate_without_exactly_one_allowed_cn(
    cert: Mapping[str, Any] | None, client_auth: ClientAuth, message: str
) -> None:
    """Anything but exactly one subject CN equal to an allowed one is IdentityRejected (403)."""
    with pytest.raises(IdentityRejected, match=re.escape(message)) as caught:
        check_client_identity(cert, META, client_auth)
    assert caught.value.status == 403


def test_rejects_everything_when_no_cn_is_allowed() -> None:
    """An empty allow-list fails closed."""
    with pytest.raises(IdentityRejected):
        check_client_identity(peercert(cn(META_CLIENT_CN)), (), "required")


def test_refuses_single_string_as_allowed_cns() -> None:
    """A bare string would make `in` a substring test, so it is a TypeError."""
    with pytest.raises(TypeError, match="not a single string"):
        check_client_identity(peercert(cn("client")), META_CLIENT_CN, "required")


def test_truncates_long_attacker_chosen_cn_in_message() -> None:
    """A rejected CN longer than 64 characters is shown cut to 64, with its length."""
    long_cn = "x" * 60 + "EVIL" + "y" * 1000
    with pytest.raises(IdentityRejected) as caught:
        check_client_identity(peercert(cn(long_cn)), META, "required")
    message = str(caught.value)
    assert "x" * 60 + "EVIL" in message
    assert "y" not in message.replace("(1064 characters)", "")
    assert "(1064 characters)" in message


def test_escapes_control_characters_of_rejected_cn() -> None:
    """A CN cannot put a line break into the message (and so into a log line)."""
    with pytest.raises(IdentityRejected) as caught:
        check_client_identity(peercert(cn("evil\nFAKE LOG LINE")), META, "required")
    assert "\n" not in str(caught.value)
