"""``waba-gateway doctor``: the pure judges table by table, then the whole report through the CLI,
against a real gateway listener for the handshake."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from brokers import BrokerServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from loopback_ports import free_port
from pki import Pki

from gateway.cli import main
from gateway.config import META_CLIENT_CN, ClientAuth, load_config
from gateway.edge.tls import client_ca_subjects
from gateway.onboarding.doctor import diagnose, verify_chain
from gateway.onboarding.readiness import (
    SHIPPED_CAS,
    Finding,
    KnownCa,
    fingerprint,
    judge_ca_bundle,
    judge_handshake,
    judge_server_chain,
    judge_tls_settings,
    judge_trust,
    known_cas,
)
from gateway.onboarding.verify_callback import Kind, Verdict
from gateway.runtime.dev import ensure_dev_files
from gateway.runtime.gateway import Gateway

NOW = datetime.now(UTC)
DAY = timedelta(days=1)
HOST = "gw.example.com"
TOKEN = "doctor-verify-token"
Certs = dict[str, list[x509.Certificate]]


def _pem(blobs: Sequence[trustme.Blob]) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(blob.bytes()) for blob in blobs]


def _self_signed(
    common_name: str,
    organization: str,
    *,
    ca: bool = True,
    not_before: datetime = NOW - DAY,
    not_after: datetime = NOW + 3650 * DAY,
) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        san = x509.SubjectAlternativeName([x509.DNSName(common_name)])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(key, hashes.SHA256())


@pytest.fixture(scope="module")
def certs() -> Certs:
    """Server chains and client CA bundles, each one thing away from what Meta accepts."""
    root = trustme.CA()
    intermediate = root.create_child_ca()

    def leaf(
        not_before: datetime | None = None, not_after: datetime | None = None
    ) -> list[x509.Certificate]:
        names = (HOST, "*.hooks.example.com", "127.0.0.1")
        issued = intermediate.issue_cert(*names, not_before=not_before, not_after=not_after)
        return _pem(issued.cert_chain_pems)

    full = leaf()
    return {
        "full": full,
        "leaf_only": _pem(root.issue_cert(HOST).cert_chain_pems),
        "self_signed": [_self_signed(HOST, "Example", ca=False)],
        "broken": [full[0], _pem([trustme.CA().cert_pem])[0]],
        "expiring": leaf(not_after=NOW + 10 * DAY),
        "expired": leaf(not_before=NOW - 30 * DAY, not_after=NOW - DAY),
        "future": leaf(not_before=NOW + DAY, not_after=NOW + 30 * DAY),
        "trustme_root": _pem([root.cert_pem]),
        "meta": [_self_signed("Meta Outbound API CA", "Meta Platforms, Inc.")],
        "meta_lookalike": [_self_signed("Meta Outbound API CA", "Meta Platforms, Inc.")],
        "meta_expired": [_self_signed("Meta Old CA", "Meta Platforms, Inc.", not_after=NOW - DAY)],
        "metadata_corp": [_self_signed("Metadata Root", "Metadata Systems Ltd")],
        "digicert": [
            _self_signed("DigiCert High Assurance EV Root CA", "DigiCert Inc"),
            _self_signed("DigiCert SHA2 High Assurance Server CA", "DigiCert Inc"),
        ],
    }


def _levels(findings: Sequence[Finding]) -> list[tuple[str, str]]:
    return [(finding.level, finding.what) for finding in findings]


def _has(findings: Sequence[Finding], level: str, fragment: str) -> bool:
    return any(f.level == level and fragment in f.line() for f in findings)


# -- the server chain ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chain", "hostname", "level", "fragment"),
    [
        ("full", None, "OK", "server chain complete"),
        ("leaf_only", None, "WARN", "holds only the leaf"),
        ("self_signed", None, "FAIL", "Meta refuses self-signed certificates"),
        ("broken", None, "FAIL", "server chain breaks: certificate 1"),
        ("full", None, "OK", "server certificate valid for"),
        ("expiring", None, "WARN", "expires in 9 days"),
        ("expired", None, "FAIL", "expired on"),
        ("future", None, "FAIL", "is not valid before"),
        ("full", HOST, "OK", f"covers {HOST}"),
        ("full", "GW.Example.com.", "OK", "covers GW.Example.com."),
        ("full", "a.hooks.example.com", "OK", "covers a.hooks.example.com"),
        ("full", "127.0.0.1", "OK", "covers 127.0.0.1"),
        ("full", "a.b.hooks.example.com", "FAIL", "does not cover a.b.hooks.example.com"),
        ("full", "hooks.example.com", "FAIL", "does not cover hooks.example.com"),
        ("full", "other.example.com", "FAIL", "does not cover other.example.com"),
        ("full", "127.0.0.2", "FAIL", "does not cover 127.0.0.2"),
    ],
)
def test_judges_the_server_chain(
    certs: Certs, chain: str, hostname: str | None, level: str, fragment: str
) -> None:
    """Each server chain gets the finding its one defect (or none) calls for."""
    findings = judge_server_chain(certs[chain], hostname, NOW)
    assert _has(findings, level, fragment), _levels(findings)


def test_full_chain_for_its_host_has_nothing_to_report(certs: Certs) -> None:
    """Leaf plus intermediate, valid for years, naming the host: every finding is OK."""
    findings = judge_server_chain(certs["full"], HOST, NOW)
    assert {finding.level for finding in findings} == {"OK"}


def test_empty_server_file_fails() -> None:
    """A cert file without certificates is a FAIL, not an exception."""
    assert _levels(judge_server_chain([], None, NOW))[0][0] == "FAIL"


# -- trust ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def anchors(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """CA files: the root that issued the server chains, and an unrelated CA."""
    folder = tmp_path_factory.mktemp("anchors")
    files = {"root": certs["trustme_root"], "other": certs["meta"]}
    for name, bundle in files.items():
        (folder / f"{name}.pem").write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in bundle))
    return {name: folder / f"{name}.pem" for name in files}


@pytest.mark.parametrize(
    ("chain", "anchor", "expected"),
    [
        ("full", "root", None),
        ("leaf_only", "root", None),
        ("full_leaf", "root", "unable to get local issuer certificate"),
        ("full", "other", "unable to get local issuer certificate"),
        ("expired", "root", "certificate has expired"),
    ],
)
def test_verifies_the_chain_against_the_trusted_roots_only(
    certs: Certs, anchors: dict[str, Path], chain: str, anchor: str, expected: str | None
) -> None:
    """Leaf plus intermediate reach the root; the leaf alone, another CA or an expiry do not."""
    server_chain = certs["full"][:1] if chain == "full_leaf" else certs[chain]
    assert verify_chain(server_chain, anchors[anchor], NOW) == expected


def test_test_certificate_is_not_publicly_trusted(certs: Certs) -> None:
    """The system store does not know a throw-away CA."""
    assert verify_chain(certs["full"], None, NOW) is not None


@pytest.mark.parametrize(
    ("error", "ca_file", "expected"),
    [
        (None, None, "OK   server chain is publicly trusted"),
        (
            "unable to get local issuer certificate",
            None,
            "WARN server certificate not publicly "
            "trusted (unable to get local issuer certificate): fine for tests, Meta will refuse it",
        ),
        (None, "ca.pem", "OK   server chain verifies against --ca-file ca.pem"),
        ("certificate has expired", "ca.pem", "WARN server chain does not verify against"),
    ],
)
def test_judges_trust(error: str | None, ca_file: str | None, expected: str) -> None:
    """Not publicly trusted is a warning: fine for tests, refused by Meta."""
    assert judge_trust(error, ca_file).line().startswith(expected)


# -- the client CA bundle -------------------------------------------------------------------------


def _known(certs: Certs) -> tuple[KnownCa, ...]:
    """Stand-ins of the shipped table for the test's certificates: "meta" as Meta's current
    CA (as tls.meta_ca_sha256 names it), "digicert" as the retired chain."""
    retired = "retired for the test"
    return (
        KnownCa("tls.meta_ca_sha256[0]", fingerprint(certs["meta"][0])),
        *(
            KnownCa(f"test DigiCert {i}", fingerprint(c), retired)
            for i, c in enumerate(certs["digicert"])
        ),
    )


@pytest.mark.parametrize(
    ("bundle", "expected"),
    [
        (
            ["meta"],
            (
                "OK",
                "Meta's CA present: O=Meta Platforms\\, Inc.,CN=Meta Outbound API CA"
                " (its sha256 is tls.meta_ca_sha256[0])",
            ),
        ),
        (
            ["digicert"],
            (
                "FAIL",
                "only the DigiCert chain (test DigiCert 0, test DigiCert 1), which expired on"
                " April 15, 2026: install meta-outbound-api-ca-2025-12.pem",
            ),
        ),
        (["meta", "digicert"], ("WARN", "the DigiCert chain is still trusted (test DigiCert 0)")),
        (["trustme_root"], ("WARN", "no Meta CA recognised (a test or private CA?)")),
        (["metadata_corp"], ("WARN", "no Meta CA recognised")),
        (["trustme_root", "digicert"], ("WARN", "no Meta CA recognised")),
        (
            ["meta_lookalike"],
            ("WARN", "names Meta, but its sha256 is not one of Meta's (tls.meta_ca_sha256)"),
        ),
        (["meta_expired"], ("WARN", "expired on")),
        ([], ("FAIL", "holds no certificate")),
    ],
)
def test_judges_the_client_ca_bundle(
    certs: Certs, bundle: list[str], expected: tuple[str, str]
) -> None:
    """Meta's CA is known by its fingerprint alone; DigiCert alone is the expired set-up."""
    findings = judge_ca_bundle(
        [cert for name in bundle for cert in certs[name]], NOW, _known(certs)
    )
    assert _has(findings, *expected), _levels(findings)


def test_an_expired_ca_that_is_meta_s_by_its_fingerprint_is_a_failure_not_present(
    certs: Certs,
) -> None:
    """Meta's CA, recognised by its fingerprint, but out of date: it admits no certificate, so
    the bundle fails (not "Meta's CA present" beside an expiry warning); with an in-date one
    beside it, that one is present."""
    expired = certs["meta_expired"][0]
    known = (KnownCa("tls.meta_ca_sha256[0]", fingerprint(expired)),)
    lines = [finding.line() for finding in judge_ca_bundle([expired], NOW, known)]
    assert not any("Meta's CA present" in line for line in lines), lines
    assert any(
        line.startswith("FAIL Meta's CA ") and "tls.meta_ca_sha256[0]) expired on" in line
        for line in lines
    ), lines
    both = (*known, KnownCa("tls.meta_ca_sha256[1]", fingerprint(certs["meta"][0])))
    findings = judge_ca_bundle([expired, certs["meta"][0]], NOW, both)
    assert _has(findings, "OK", "(its sha256 is tls.meta_ca_sha256[1])"), _levels(findings)
    assert not any(finding.level == "FAIL" for finding in findings), _levels(findings)


@pytest.mark.parametrize("bundle", [["meta_lookalike"], ["meta_lookalike", "trustme_root"]])
def test_a_ca_that_only_names_meta_is_never_called_meta_s(certs: Certs, bundle: list[str]) -> None:
    """Same subject as Meta's CA, another key: not Meta's, whatever its organisation says."""
    findings = judge_ca_bundle(
        [cert for name in bundle for cert in certs[name]], NOW, _known(certs)
    )
    assert not any("Meta's CA present" in finding.line() for finding in findings)


def test_the_dev_stand_in_ca_is_not_meta_s(tmp_path: Path) -> None:
    """`serve --dev`'s CA names Meta in its organisation: doctor says it is not Meta's."""
    files, _ = ensure_dev_files(tmp_path / "dev")
    bundle = x509.load_pem_x509_certificates(files.meta_ca.read_bytes())
    lines = [finding.line() for finding in judge_ca_bundle(bundle, NOW, known_cas([]))]
    assert not any("Meta's CA present" in line for line in lines)
    assert any(line.startswith("WARN client CA ") and "names Meta, but" in line for line in lines)


def test_a_fingerprint_in_tls_meta_ca_sha256_matches_in_either_form(certs: Certs) -> None:
    """Colons or none, any case: the configured fingerprint finds the CA, and says which."""
    plain = fingerprint(certs["meta"][0]).replace(":", "").lower()
    for configured in ([plain], ["00" * 32, fingerprint(certs["meta"][0])]):
        findings = judge_ca_bundle(certs["meta"], NOW, known_cas(configured))
        index = len(configured) - 1
        assert _has(findings, "OK", f"(its sha256 is tls.meta_ca_sha256[{index}])")


def test_the_shipped_digicert_root_is_the_one_in_the_system_store() -> None:
    """The shipped fingerprint of the DigiCert root is that of Debian's ca-certificates copy."""
    store = Path(ssl.get_default_verify_paths().openssl_capath or "/etc/ssl/certs")
    root = x509.load_pem_x509_certificate(
        (store / "DigiCert_High_Assurance_EV_Root_CA.pem").read_bytes()
    )
    (shipped,) = [ca for ca in SHIPPED_CAS if ca.name == "DigiCert High Assurance EV Root CA"]
    assert fingerprint(root) == shipped.sha256
    assert all(ca.retired for ca in SHIPPED_CAS)


def test_bundle_with_meta_ca_fails_nothing(certs: Certs) -> None:
    """Meta's CA next to a private one is fine: nothing above OK."""
    findings = judge_ca_bundle(certs["meta"] + certs["trustme_root"], NOW, _known(certs))
    assert {finding.level for finding in findings} == {"OK"}


def test_lists_each_ca_as_check_does(pki: Pki) -> None:
    """Subjects and SHA-256 fingerprints read exactly as `check` prints them."""
    bundle = x509.load_pem_x509_certificates(pki.client_ca_file.read_bytes())
    lines = [finding.line() for finding in judge_ca_bundle(bundle, NOW)]
    for subject, sha256 in client_ca_subjects(pki.client_ca_file):
        assert f"OK   client CA {subject} sha256 {sha256}" in lines


# -- settings and the handshake verdict ---------------------------------------------------------


@pytest.mark.parametrize(
    ("client_auth", "client_cn", "expected"),
    [
        ("required", (META_CLIENT_CN,), ["OK", "OK"]),
        ("optional", (META_CLIENT_CN,), ["WARN", "OK"]),
        ("off", (META_CLIENT_CN,), ["WARN", "OK"]),
        ("required", ("other.example.com",), ["OK", "WARN"]),
    ],
)
def test_judges_client_auth_and_cn(
    pki: Pki, client_auth: ClientAuth, client_cn: tuple[str, ...], expected: list[str]
) -> None:
    """Optional and off are rollout stages, not the goal; Meta's CN must be accepted."""
    tls = pki.tls_config(client_auth=client_auth, client_cn=client_cn)
    assert [finding.level for finding in judge_tls_settings(tls)] == expected


def test_optional_client_auth_says_what_to_do_next(pki: Pki) -> None:
    """The optional stage names the next step of the rollout."""
    finding = judge_tls_settings(pki.tls_config(client_auth="optional"))[0]
    assert finding.todo == "switch to required once Meta presents its certificate"


@pytest.mark.parametrize(
    ("kind", "message", "client_auth", "level"),
    [
        ("verified", "verified: HTTP 200", "optional", "OK"),
        ("wrong_body", "wrong body: HTTP 200, but the body is empty", "optional", "FAIL"),
        ("token_refused", "verify token refused: HTTP 403", "optional", "FAIL"),
        ("wrong_status", "unexpected status: HTTP 404", "optional", "FAIL"),
        ("connection", "cannot resolve gw.example.com", "optional", "FAIL"),
        ("refused", "connection refused: nothing listens", "optional", "FAIL"),
        # Only a hang-up once connected, or the TLS alert, is how a listener asks for a client
        # certificate: nothing listening or no answer is no gateway, whatever client_auth says.
        ("refused", "connection refused: nothing listens", "required", "FAIL"),
        ("timeout", "timeout: no answer within 10 s", "required", "FAIL"),
        ("connection", "cannot resolve gw.example.com", "required", "FAIL"),
        ("closed", "the server closed the connection", "required", "WARN"),
        ("closed", "the server closed the connection", "optional", "FAIL"),
        ("tls", "client certificate required: the server wants one", "required", "WARN"),
        ("tls", "untrusted server certificate: it is self-signed", "optional", "WARN"),
    ],
)
def test_judges_the_handshake(
    kind: Kind, message: str, client_auth: ClientAuth, level: str
) -> None:
    """OK only for the exact challenge; TLS trouble is reported where it comes from."""
    verdict = Verdict(kind, message)
    assert judge_handshake("https://gw.example.com/webhook", verdict, client_auth).level == level


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("refused", "connection refused: nothing listens on 127.0.0.1:8443"),
        ("timeout", "timeout: no answer within 10 s"),
        ("connection", "cannot resolve gw.example.com: Name or service not known"),
    ],
)
@pytest.mark.parametrize("client_auth", ["off", "optional", "required"])
def test_no_gateway_answering_asks_whether_it_runs(
    kind: Kind, message: str, client_auth: ClientAuth
) -> None:
    """Nothing listening, no answer in time or a name that does not resolve: a FAIL asking
    whether the gateway runs, never excused as a listener wanting a client certificate."""
    finding = judge_handshake("https://gw.example.com/webhook", Verdict(kind, message), client_auth)
    assert finding.level == "FAIL"
    assert finding.what == f"handshake through https://gw.example.com/webhook: {message}"
    assert finding.todo == "is the gateway running, and does this address reach it?"


# -- the whole report -----------------------------------------------------------------------------


def _config(
    tmp_path: Path,
    pki: Pki,
    *,
    client_auth: ClientAuth = "optional",
    token: str = TOKEN,
    target_url: str | None = None,
    outbox: Path | None = None,
    key_file: Path | None = None,
    extra: str = "",
    name: str = "gateway",
) -> Path:
    target = f'[[targets]]\nname = "inbox"\nurl = "{target_url}"\n' if target_url else ""
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f"""\
[listen]
host = "127.0.0.1"
[tls]
cert_file = "{pki.server_chain_file}"
key_file = "{key_file or pki.server_key_file}"
client_ca_file = "{pki.client_ca_file}"
client_auth = "{client_auth}"
[meta]
verify_tokens = ["{token}"]
app_secrets = ["doctor-app-secret"]
[outbox]
path = "{outbox or tmp_path / "var" / "outbox.sqlite3"}"
[admin]
enabled = false
{extra}
{target}"""
    )
    return path


def _report(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.splitlines()


@pytest.fixture
def listening() -> Iterator[str]:
    """A TCP port that accepts connections, as a reachable target's URL."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/hook"


def test_bad_config_is_one_fail_line(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config that does not load is one FAIL line naming the key, and exit 1, not a traceback."""
    config = _config(tmp_path, pki, extra="[unknown]\n")
    assert main(["doctor", "--config", str(config)]) == 1
    (line,) = _report(capsys)
    assert line.startswith(f"FAIL {config}: unknown")
    assert line.endswith("fix the configuration, then run doctor again")


def test_missing_config_is_one_fail_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No config file at all is also one FAIL line."""
    assert main(["doctor", "--config", str(tmp_path / "absent.toml")]) == 1
    assert [line[:5] for line in _report(capsys)] == ["FAIL "]


def test_ready_config_reports_each_check_and_exits_0(
    tmp_path: Path, pki: Pki, listening: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A loadable config with a test PKI has warnings, no FAIL: exit 0, every line levelled."""
    assert main(["doctor", "--config", str(_config(tmp_path, pki, target_url=listening))]) == 0
    report = _report(capsys)
    assert all(line[:5] in ("OK   ", "WARN ", "FAIL ") for line in report)
    expected = [
        "OK   configuration ",
        "OK   TLS files load and tls.key_file matches tls.cert_file",
        "WARN tls.cert_file holds only the leaf",
        "OK   server certificate valid for",
        "WARN server certificate not publicly trusted",
        "OK   client CA ",
        "WARN no Meta CA recognised (a test or private CA?)",
        "WARN client_auth = optional: certificate optional: switch to required",
        f"OK   client_cn accepts {META_CLIENT_CN}",
        "OK   target 'inbox' at 127.0.0.1:",
        "OK   outbox ",
        "WARN hostname and handshake not checked: run doctor with --public-url",
    ]
    missing = [start for start in expected if not any(line.startswith(start) for line in report)]
    assert missing == [], report


def test_unreachable_target_is_a_warning(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    """The outbox keeps notifications for a target that is down: WARN, still exit 0."""
    url = f"http://127.0.0.1:{free_port()}/hook"
    assert main(["doctor", "--config", str(_config(tmp_path, pki, target_url=url))]) == 0
    assert any(line.startswith("WARN target 'inbox'") for line in _report(capsys))


@pytest.mark.parametrize("host", ["inbox..internal", "a" * 64 + ".internal", ".inbox.internal"])
def test_target_host_that_cannot_be_looked_up_fails_in_one_line(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str], host: str
) -> None:
    """A host name with an empty label or one over 63 characters can never be resolved, so no
    delivery reaches it: the configuration refuses it, and doctor says so in one FAIL line
    naming the key (exit 1), not an outage to wait out."""
    url = f"http://{host}:{free_port()}/hook"
    code = main(["doctor", "--config", str(_config(tmp_path, pki, target_url=url))])
    (line,) = _report(capsys)
    assert code == 1
    assert line.startswith("FAIL "), line
    assert f"targets[0].url = 'http://{host}:" in line
    assert line.endswith("fix the configuration, then run doctor again")


async def test_a_public_url_no_request_can_be_made_to_is_a_finding(
    tmp_path: Path, pki: Pki
) -> None:
    """The command refuses such a --public-url; diagnose() given one reports it as a FAIL."""
    config = load_config(_config(tmp_path, pki))
    url = "https://gw..example.com/webhook"
    findings = await diagnose(config, datetime.now(UTC), public_url=url)
    (handshake,) = [finding for finding in findings if "handshake" in finding.what]
    assert handshake.level == "FAIL"
    assert handshake.what.startswith("handshake not sent: URL ")
    assert "'gw..example.com' cannot be looked up" in handshake.what


@pytest.mark.parametrize("client_auth", ["optional", "required"])
def test_nothing_listening_fails_the_handshake_whatever_client_auth_says(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str], client_auth: ClientAuth
) -> None:
    """With no gateway running at the public URL, doctor does not take the refused connection
    for a listener wanting a client certificate: FAIL, "is the gateway running", exit 1."""
    url = f"https://localhost:{free_port()}/webhook"
    args = ["doctor", "--config", str(_config(tmp_path, pki, client_auth=client_auth))]
    code = main([*args, "--public-url", url, "--ca-file", str(pki.server_ca_file)])
    (line,) = [line for line in _report(capsys) if line[5:].startswith("handshake")]
    assert line.startswith(f"FAIL handshake through {url}: connection refused: "), line
    assert line.endswith("is the gateway running, and does this address reach it?")
    assert code == 1


def test_unwritable_outbox_fails(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    """An outbox path SQLite cannot open (here a folder) is a FAIL and exit 1."""
    config = _config(tmp_path, pki, outbox=tmp_path)
    assert main(["doctor", "--config", str(config)]) == 1
    assert any(line.startswith(f"FAIL outbox.path = '{tmp_path}'") for line in _report(capsys))


def test_outbox_database_is_checked_for_writes(
    tmp_path: Path, pki: Pki, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """With outbox.url the doctor checks the database takes writes, naming it without its
    password; a database that does not answer is a FAIL."""
    config = _config(tmp_path, pki)
    text = config.read_text()
    path_line = next(line for line in text.splitlines() if line.startswith("path = "))
    config.write_text(text.replace(path_line, f'url = "{pg_url}"'))
    assert main(["doctor", "--config", str(config)]) == 0
    assert any(line.startswith("OK   outbox database postgresql://") for line in _report(capsys))
    config.write_text(text.replace(path_line, 'url = "postgresql://u:pw@127.0.0.1:9/db"'))
    assert main(["doctor", "--config", str(config)]) == 1
    (failed,) = [line for line in _report(capsys) if line.startswith("FAIL outbox.url")]
    assert "u:***@127.0.0.1:9" in failed
    assert ":pw@" not in failed


def test_key_of_another_certificate_fails(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key that does not match the server certificate is a FAIL, as serve would refuse it."""
    config = _config(tmp_path, pki, key_file=pki.client_key_file)
    assert main(["doctor", "--config", str(config)]) == 1
    assert any("does not match tls.cert_file" in line for line in _report(capsys))


@pytest.mark.parametrize(
    "options",
    [
        ["--public-url", "http://localhost/webhook"],
        ["--public-url", "localhost/webhook"],
        ["--public-url", "https://gw..example.com/webhook"],
        ["--public-url", "https://" + "a" * 64 + ".example.com/webhook"],
        ["--ca-file", "absent-ca.pem"],
    ],
)
def test_bad_options_are_usage_errors(
    tmp_path: Path, pki: Pki, options: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A non-https callback (Meta calls https only), a host name that cannot be looked up (an
    empty label, one over 63 characters) or a missing CA file: one line, exit 2, no report."""
    assert main(["doctor", "--config", str(_config(tmp_path, pki)), *options]) == 2
    output = capsys.readouterr()
    assert output.out == ""
    assert output.err.startswith("error: ")
    assert output.err.count("\n") == 1


def test_host_outside_the_certificate_fails(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    """A public URL whose host the certificate does not name is a FAIL and exit 1."""
    url = f"https://127.0.0.2:{free_port()}/webhook"
    args = ["doctor", "--config", str(_config(tmp_path, pki)), "--public-url", url]
    assert main([*args, "--ca-file", str(pki.server_ca_file)]) == 1
    report = _report(capsys)
    assert any(
        line.startswith("FAIL the server certificate does not cover 127.0.0.2") for line in report
    )
    assert any(line.startswith(f"FAIL handshake through {url}") for line in report)


async def _doctor_against_gateway(
    tmp_path: Path,
    pki: Pki,
    *,
    client_auth: ClientAuth = "optional",
    served_token: str = TOKEN,
    ca_file: Path | None = None,
) -> tuple[int, str]:
    """Run a gateway from one config and doctor (with ``TOKEN``) against it; the handshake URL."""
    served_file = _config(tmp_path, pki, client_auth=client_auth, token=served_token, name="served")
    served = load_config(served_file)
    served = dataclasses.replace(served, listen=dataclasses.replace(served.listen, port=0))
    checked = _config(tmp_path, pki, client_auth=client_auth)
    async with Gateway(served) as gateway:
        url = f"https://localhost:{gateway.port}/webhook"
        args = ["doctor", "--config", str(checked), "--public-url", url]
        if ca_file is not None:
            args += ["--ca-file", str(ca_file)]
        return await asyncio.to_thread(main, args), url


@pytest.mark.parametrize(
    ("client_auth", "served_token", "with_ca_file", "code", "handshake", "also"),
    [
        # With the private CA given, Meta's GET through the real listener comes back verbatim.
        pytest.param(
            "optional",
            TOKEN,
            True,
            0,
            "OK   handshake through {url}: verified",
            ["OK   server chain verifies against --ca-file {ca_file}"],
            id="passes-with-the-ca-file",
        ),
        # Without --ca-file the test certificate is untrusted: doctor says so, names the
        # option, and still reports the rest.
        pytest.param(
            "optional",
            TOKEN,
            False,
            0,
            "WARN handshake not checked: untrusted server certificate",
            ["OK   outbox"],
            id="needs-a-trusted-certificate",
        ),
        # A gateway running with other verify tokens refuses doctor's GET.
        pytest.param(
            "optional",
            "another-token",
            True,
            1,
            "FAIL handshake through {url}: verify token refused: HTTP 403",
            [],
            id="another-verify-token-fails",
        ),
        # doctor has no Meta certificate: with client_auth = required it says why it cannot check.
        pytest.param(
            "required",
            TOKEN,
            True,
            0,
            "WARN handshake not checked: {url} wants a client certificate",
            [],
            id="required-client-certificate-is-not-checked",
        ),
    ],
)
async def test_handshake_through_a_running_listener_is_judged_in_one_line(
    tmp_path: Path,
    pki: Pki,
    capsys: pytest.CaptureFixture[str],
    client_auth: ClientAuth,
    served_token: str,
    with_ca_file: bool,
    code: int,
    handshake: str,
    also: list[str],
) -> None:
    """doctor's GET of the handshake through a real gateway listener: one handshake line saying
    what came back or why it was not checked, the exit code it calls for, and never the verify
    token in the report."""
    ca_file = pki.server_ca_file if with_ca_file else None
    exit_code, url = await _doctor_against_gateway(
        tmp_path, pki, client_auth=client_auth, served_token=served_token, ca_file=ca_file
    )
    report = _report(capsys)
    (line,) = [line for line in report if line[5:].startswith("handshake")]
    assert line.startswith(handshake.format(url=url)), report
    if not with_ca_file:
        assert "--ca-file" in line
    for start in also:
        expected = start.format(url=url, ca_file=pki.server_ca_file)
        assert any(line.startswith(expected) for line in report), report
    assert TOKEN not in "\n".join(report)
    assert exit_code == code


def test_broker_targets_are_probed_as_check_does(
    tmp_path: Path,
    pki: Pki,
    redis: BrokerServer,
    nats: BrokerServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A Redis or NATS target is connected to with its own protocol (not a bare TCP connect to
    port 80): OK when it answers, FAIL for a subject no JetStream stream captures."""
    extra = (
        f'[[targets]]\nname = "queue"\nkind = "redis"\nurl = "{redis.url}"\nstream = "s"\n'
        f'[[targets]]\nname = "bus"\nkind = "nats"\nurl = "{nats.url}"\nsubject = "none.x"\n'
    )
    assert main(["doctor", "--config", str(_config(tmp_path, pki, extra=extra))]) == 1
    report = _report(capsys)
    assert any(line.startswith("OK   target 'queue': redis 127.0.0.1:") for line in report)
    assert any(
        line.startswith("FAIL target 'bus': nats") and "no JetStream stream captures" in line
        for line in report
    ), report


@pytest.mark.parametrize("host", ["bücher.example", "xn--bcher-kva.example", "BÜCHER.example"])
async def test_an_internationalised_public_host_is_compared_as_the_certificate_names_it(
    tmp_path: Path, pki: Pki, host: str
) -> None:
    """A certificate names an internationalised host by its A-label (xn--...), as the handshake
    looks it up: a --public-url written in Unicode is covered by it all the same, not a FAIL."""
    issued = trustme.CA().issue_cert("bücher.example")
    chain, key = tmp_path / "idn-chain.pem", tmp_path / "idn-key.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    path = _config(tmp_path, pki, key_file=key)
    path.write_text(path.read_text().replace(str(pki.server_chain_file), str(chain)))
    config = load_config(path)
    url = f"https://{host}:{free_port()}/webhook"
    findings = await diagnose(config, datetime.now(UTC), public_url=url)
    (covers,) = [
        finding
        for finding in findings
        if "server certificate" in finding.what and "cover" in finding.what
    ]
    assert covers == Finding("OK", "the server certificate covers xn--bcher-kva.example")
