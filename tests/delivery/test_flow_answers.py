"""What the outbox keeps of a target's answer to a WhatsApp Flow's answer (an interactive
message of type ``nfm_reply``), as a table (gateway.delivery.answers).

The form the user filled in arrives as ``nfm_reply.response_json``: JSON inside a string, so
in the raw body each quote of the form is escaped, and each of its escapes escaped again. The
notification is Meta's sample (WhatsApp Flows, "Receiving Flow Response") with a form filled
in, sent as Meta sends it (non-ASCII escaped); the form's own JSON is written both ways.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from gateway.delivery.answers import kept_answer, personal_values, shown_answer

NAME = "José Araújo"
EMAIL = "jose.araujo@example.com"
REQUEST = "Quero trocar o tamanho da camisa do pedido"
FORM = {
    "flow_token": "AQAAAAACS5FpgQ_cAAAAAD0QI3s.",
    "screen_0_Nome_0": NAME,
    "screen_0_Email_1": EMAIL,
    "screen_1_Pedido_0": REQUEST,
    "screen_1_Tamanho_1": ["0_M"],
}


def flow_answer(response_json: str) -> bytes:
    """Meta's sample Flow answer (a messages notification) carrying ``response_json``."""
    message = {
        "context": {"from": "16315558151", "id": "gBGGEiRVVgBPAgm7FUgc73noXjo"},
        "from": "16505551234",
        "id": "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQUFERjg0NDEzNDdFODU3MUMxMAA=",
        "type": "interactive",
        "interactive": {
            "type": "nfm_reply",
            "nfm_reply": {"name": "flow", "body": "Sent", "response_json": response_json},
        },
        "timestamp": "1749854575",
    }
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": "106540352242922"},
        "contacts": [{"profile": {"name": "Sheena Nelson"}, "wa_id": "16505551234"}],
        "messages": [message],
    }
    entry = {"id": "102290129340398", "changes": [{"value": value, "field": "messages"}]}
    envelope = {"object": "whatsapp_business_account", "entry": [entry]}
    return json.dumps(envelope, ensure_ascii=True).encode()


def quoted_form(body: bytes) -> bytes:
    """The ``response_json`` string of ``body`` exactly as the raw body spells it."""
    (change,) = json.loads(body)["entry"][0]["changes"]
    form: str = change["value"]["messages"][0]["interactive"]["nfm_reply"]["response_json"]
    spelt = json.dumps(form).encode()
    assert spelt in body
    return spelt


BODIES = [
    pytest.param(flow_answer(json.dumps(FORM)), id="form-json-escaped"),
    pytest.param(flow_answer(json.dumps(FORM, ensure_ascii=False)), id="form-json-utf8"),
]
WITHHELD = "(application/json; not kept: it repeats the notification)"
Answer = Callable[[bytes], bytes]


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize(
    "answer_to",
    [
        pytest.param(lambda body: f"lead {EMAIL} exists".encode(), id="e-mail-as-typed"),
        pytest.param(lambda body: f"no customer {NAME}".encode(), id="name-as-typed"),
        pytest.param(lambda body: b"no customer Jos\\u00e9 Ara\\u00fajo", id="name-escaped"),
        pytest.param(lambda body: b"no customer Jos\\\\u00e9 Ara\\\\u00fajo", id="name-twice"),
        pytest.param(lambda body: f"cannot parse {REQUEST[6:30]}".encode(), id="text-piece"),
        pytest.param(lambda body: json.dumps(FORM).encode(), id="form-as-json"),
        pytest.param(lambda body: json.dumps(FORM, ensure_ascii=False).encode(), id="form-utf8"),
        pytest.param(lambda body: b'{"invalid": ' + quoted_form(body) + b"}", id="form-quoted"),
    ],
)
def test_an_answer_repeating_a_value_of_a_flow_form_is_not_kept(
    body: bytes, answer_to: Answer
) -> None:
    """Each value the user typed into the Flow (an e-mail, a name, free text), and the form
    whole, is a personal value in each spelling it takes: an answer repeating one is kept only
    as its status and content type, like one repeating the sender's phone number."""
    assert kept_answer(body, 422, "application/json", answer_to(body)) == WITHHELD


@pytest.mark.parametrize("body", BODIES)
def test_each_value_of_a_flow_form_is_a_personal_value_in_each_spelling(body: bytes) -> None:
    """As typed, as the form's JSON escapes it, and as the notification escapes that again."""
    values = personal_values(body)
    assert values is not None
    assert {NAME, "Jos\\u00e9 Ara\\u00fajo", "Jos\\\\u00e9 Ara\\\\u00fajo"} <= values
    assert {EMAIL, REQUEST, "AQAAAAACS5FpgQ_cAAAAAD0QI3s."} <= values


@pytest.mark.parametrize(
    ("answer", "kept"),
    [
        pytest.param(
            b'{"error": "bad form {\\"name\\": \\"Bob Stone\\", \\"email\\": \\"bob@x.io\\"}"}',
            '{"error": "bad form {\\"name\\": \\"***\\", \\"email\\": \\"***\\"}"}',
            id="escaped-personal-keys",
        ),
        pytest.param(
            b'{"error": "{\\"text\\": \\"say \\\\\\"hi\\\\\\" Bob\\", \\"code\\": \\"E12\\"}"}',
            '{"error": "{\\"text\\": \\"***\\", \\"code\\": \\"E12\\"}"}',
            id="escaped-quote-inside-a-value",
        ),
        pytest.param(
            b'{"error": "{\\"phone\\": 4155550000, \\"code\\": 7}"}',
            '{"error": "{\\"phone\\": \\"***\\", \\"code\\": 7}"}',
            id="escaped-number",
        ),
        pytest.param(
            b'{"response_json": "{\\"comment\\": \\"Bob Stone\\"}", "ok": false}',
            '{"response_json": "***", "ok": false}',
            id="another-form",
        ),
        pytest.param(b"rate limited, retry later", "rate limited, retry later", id="no-echo"),
    ],
)
def test_personal_keys_in_json_held_in_a_string_are_masked(answer: bytes, kept: str) -> None:
    """An answer that repeats nothing of the notification but quotes JSON in a string (a form
    of its own, a body in an error field) has that JSON's personal values masked, as the
    same keys are outside a string; and what was kept is shown as it is."""
    body = flow_answer(json.dumps(FORM))
    assert kept_answer(body, 400, "application/json", answer) == kept
    assert shown_answer(kept) == kept


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize(
    "answer",
    [
        b"flow_token expired",
        b"unknown flow",
        b'{"error": "no flow with this token"}',
    ],
)
def test_an_answer_naming_a_flow_is_kept_to_a_flow_answer(body: bytes, answer: bytes) -> None:
    """``nfm_reply.name`` is the kind of reply ("flow"), not a person's name: an answer that
    mentions a flow repeats nothing of the user's, and is kept for the operator to read."""
    assert kept_answer(body, 400, "application/json", answer) == answer.decode()


def test_a_stored_answer_quoting_a_form_is_shown_masked() -> None:
    """A row an older version stored whole: the form's personal values are masked when it is
    shown, in the form and in JSON quoted in a string."""
    stored = '{"response_json": "{\\"a\\": \\"Bob Stone\\"}", "e": "{\\"name\\": \\"Bob Stone\\"}"}'
    assert shown_answer(stored) == '{"response_json": "***", "e": "{\\"name\\": \\"***\\"}"}'


def test_an_answer_to_a_flow_form_nested_too_deep_to_read_is_not_kept() -> None:
    """A form whose JSON is nested deeper than the parsers read holds values that cannot be
    told: as for a notification nested so deep, only the content type is kept."""
    body = flow_answer("[" * 5000 + "]" * 5000)
    assert personal_values(body) is None
    assert kept_answer(body, 500, "text/plain", b"try later") == (
        "(text/plain; not kept: the notification cannot be read)"
    )


@pytest.mark.parametrize("body", BODIES)
def test_the_answer_to_a_delivered_flow_form_is_not_kept(body: bytes) -> None:
    """Delivered: nothing of the answer is kept, whatever it repeats."""
    assert kept_answer(body, 200, "application/json", json.dumps(FORM).encode()) == ""
