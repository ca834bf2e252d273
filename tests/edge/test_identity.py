"""gateway.edge.identity: table-driven over getpeercert() dicts, no sockets, no event loop."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import pytest

from gateway.config import META_CLIENT_CN, ClientAuth
from gateway.edge.identity import Verdict, Verdicts, check_client_identity, peer_common_names
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


class _Decoder:
    """Stands for ``getpeercert()`` of one certificate: its dict, and how often it was asked."""

    def __init__(self, cert: Mapping[str, Any] | None) -> None:
        self.cert = cert
        self.asked = 0

    def __call__(self) -> Mapping[str, Any] | None:
        self.asked += 1
        return self.cert


EXPIRES = "Jun  1 12:00:00 2027 GMT"


@pytest.mark.parametrize(
    ("cert", "client_auth", "expected"),
    [
        pytest.param(
            peercert(cn(META_CLIENT_CN), notAfter=EXPIRES),
            "required",
            Verdict(META_CLIENT_CN, None, EXPIRES),
            id="meta",
        ),
        pytest.param(
            peercert(cn("evil.example.com"), notAfter=EXPIRES),
            "required",
            Verdict(None, "client certificate CN 'evil.example.com' is not accepted", EXPIRES),
            id="wrong-cn",
        ),
        pytest.param(
            peercert(cn(META_CLIENT_CN), cn(META_CLIENT_CN)),
            "required",
            Verdict(None, "client certificate has 2 subject CNs: not accepted", None),
            id="two-cns",
        ),
        pytest.param({}, "off", Verdict(None, None, None), id="off-cert-none-empty-dict"),
        pytest.param(
            {},
            "required",
            Verdict(None, "a client certificate is required and none was presented", None),
            id="required-empty-dict",
        ),
    ],
)
def test_a_certificates_verdict_is_the_checks_and_is_decoded_once(
    cert: Mapping[str, Any], client_auth: ClientAuth, expected: Verdict
) -> None:
    """The verdict on a certificate's bytes is check_client_identity's on its dict (its CN or
    refusal, and its notAfter), and the same bytes again are not decoded again."""
    verdicts = Verdicts(META, client_auth)
    decoder = _Decoder(cert)
    assert [verdicts.of(b"der-1", decoder) for _ in range(3)] == [expected] * 3
    assert decoder.asked == 1


def test_no_certificate_is_decided_without_decoding() -> None:
    """No certificate presented: no dict is asked for, and the decision is the check's."""
    decoder = _Decoder(None)
    assert Verdicts(META, "optional").of(None, decoder) == Verdict(None, None, None)
    refused = Verdicts(META, "required").of(None, decoder)
    assert refused.refusal == "a client certificate is required and none was presented"
    assert decoder.asked == 0


def test_a_refused_verdict_raises_a_new_403_each_time() -> None:
    """A remembered refusal is raised as IdentityRejected (403) on every connection."""
    verdict = Verdicts(META, "required").of(b"der", _Decoder(peercert(cn("evil.example.com"))))
    raised = []
    for _ in range(2):
        with pytest.raises(
            IdentityRejected, match=re.escape("'evil.example.com' is not accepted")
        ) as caught:
            verdict.accepted()
        assert caught.value.status == 403
        raised.append(caught.value)
    assert raised[0] is not raised[1]


def test_only_the_last_few_certificates_are_remembered() -> None:
    """At most ``size`` verdicts are kept, the oldest forgotten first: a certificate seen
    before the last ``size`` others is decoded again."""
    verdicts = Verdicts(META, "required", size=2)
    decoders = [_Decoder(peercert(cn(META_CLIENT_CN))) for _ in range(3)]
    for index, decoder in enumerate(decoders):
        verdicts.of(b"der-%d" % index, decoder)
    verdicts.of(b"der-2", decoders[2])
    verdicts.of(b"der-0", decoders[0])
    assert [decoder.asked for decoder in decoders] == [2, 1, 1]


def test_the_same_certificate_under_other_rules_gets_their_verdict() -> None:
    """Verdicts are made under one set of rules: another allow-list (a reload) decides anew."""
    cert = peercert(cn(NEXT_CN))
    assert Verdicts(META, "required").of(b"der", _Decoder(cert)).cn is None
    assert Verdicts((META_CLIENT_CN, NEXT_CN), "required").of(b"der", _Decoder(cert)).cn == NEXT_CN
