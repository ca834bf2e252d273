"""What the outbox keeps of a target's answer, as a table (gateway.delivery.answers)."""

from __future__ import annotations

import html
import json

import pytest
from helpers import message_body

from gateway.delivery.answers import EXCERPT_CHARS, kept_answer, personal_values, shown_answer

BODY = json.dumps(
    {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "102290129340398",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "contacts": [
                                {"profile": {"name": "Ana Lima"}, "wa_id": "5511988887777"}
                            ],
                            "messages": [
                                {
                                    "from": "5511988887777",
                                    "id": "wamid.abc",
                                    "type": "text",
                                    "text": {"body": "Olá, meu pedido 8812 não chegou ainda"},
                                }
                            ],
                        },
                    }
                ],
            }
        ],
    },
    ensure_ascii=True,
).encode()
WITHHELD = "(text/html; not kept: it repeats the notification)"


@pytest.mark.parametrize(
    ("answer", "kept"),
    [
        (b"", ""),
        (b"ok", "ok"),
        (b'{"ok":true}', '{"ok":true}'),
        (b"unknown account", "unknown account"),
        (b"<p>hello Ana Lima</p>", WITHHELD),
        (b"no such user 5511988887777", WITHHELD),
        (BODY, WITHHELD),
        ("pedido 8812 não chegou".encode(), WITHHELD),  # a piece of the text, decoded
        (b"pedido 8812 n\\u00e3o chegou", WITHHELD),  # ... and as Meta escaped it
        (b"wamid.abc is a duplicate", "wamid.abc is a duplicate"),  # ids are not personal
        (b"call +55 11 2222-3333 for help", "call *** for help"),
        (b"write to help@example.com", "write to ***"),
        (b'{"name": "Bob", "phone": 12345}', '{"name": "***", "phone": "***"}'),
    ],
)
def test_an_answer_is_kept_only_as_far_as_it_cannot_carry_the_notification(
    answer: bytes, kept: str
) -> None:
    """Echoes become status and type; anything else is kept with personal-looking parts
    masked."""
    assert kept_answer(BODY, 422, "text/html; charset=utf-8", answer) == kept


@pytest.mark.parametrize("status", [200, 201, 204, 299])
@pytest.mark.parametrize("answer", [b"", b"ok", BODY, b'{"received": "Ana Lima"}'])
def test_the_answer_to_a_delivered_attempt_is_not_kept(status: int, answer: bytes) -> None:
    """Delivered: nothing of the answer is kept (nor read), echo or not."""
    assert kept_answer(BODY, status, "application/json", answer) == ""


def test_a_long_answer_is_cut_to_the_excerpt_length() -> None:
    """At most EXCERPT_CHARS characters and an ellipsis."""
    kept = kept_answer(BODY, 500, "text/plain", b"x" * 5000)
    assert kept == "x" * EXCERPT_CHARS + "..."


def test_an_answer_without_content_type_says_so() -> None:
    """The content type is what the target said, or that it said none."""
    assert kept_answer(BODY, 400, None, b"Ana Lima") == (
        "(no content type; not kept: it repeats the notification)"
    )


def test_a_body_that_is_not_json_has_no_personal_values() -> None:
    """Nothing to compare with: the answer is kept masked (a split delivery is JSON too)."""
    assert personal_values(b"not json") == set()
    assert kept_answer(b"not json", 503, "text/plain", b"not json") == "not json"


@pytest.mark.parametrize(
    "kept",
    [
        WITHHELD,
        "unknown account",
        '{"name": "***", "phone": "***"}',
        "x" * EXCERPT_CHARS + "...",
        kept_answer(BODY, 429, "text/plain", b"call +55 11 2222-3333 or mail a@b.example"),
    ],
)
def test_what_kept_answer_made_is_shown_unchanged(kept: str) -> None:
    """Showing masks and bounds again; what was kept already passes through as it is."""
    assert shown_answer(kept) == kept


def test_an_answer_stored_whole_is_shown_masked_and_bounded() -> None:
    """A row from before: the masks and the bound apply when it is shown."""
    whole = '{"wa_id": "5511988887777", "body": "hello"} ' + "y" * 1000
    shown = shown_answer(whole)
    assert shown is not None
    assert shown.startswith('{"wa_id": "***", "body": "***"} yyy')
    assert len(shown) == EXCERPT_CHARS + 3
    assert shown_answer(None) is None
    assert shown_answer("") == ""


def test_an_html_page_that_echoes_the_text_with_character_references_is_not_kept() -> None:
    """An error page writes the text it echoes with character references (the apostrophes
    as &#x27;, other characters as &#224;): in this text one stands in every block the echo
    check looks for, and the page is still found to repeat it."""
    text = "d'à d'é d'è d'ù d'ç d'ô d'ê d'î d'û d'ë"
    body = message_body(text)
    page = html.escape(text).encode("ascii", "xmlcharrefreplace")
    assert text.encode() not in page
    answer = b"<html><body><p>Unknown command: " + page + b"</p></body></html>"
    assert kept_answer(body, 400, "text/html", answer) == WITHHELD
