"""What the outbox keeps of a target's answer, and so what the admin API and console show.

Rule: an answer can carry the notification back (a target that echoes the request in its error
page). The answer to a delivered attempt (2xx) is not kept at all: its status is kept. Of any
other, an answer that repeats any personal value of the request it answers (a phone number,
a wa_id or user id, a name, message text, a caption, an e-mail address...) is kept only as its
status and content type; any other answer is kept as an excerpt of at most
:data:`EXCERPT_CHARS` characters, with what looks like personal data masked all the same (long
digit runs such as phone numbers, e-mail addresses, and the values of JSON keys that name
personal fields). Pure: bytes and values in, text out.

An echo is a whole personal value (of :data:`MIN_ECHO_CHARS` characters or more) or a piece
of one at least 23 characters long (``2 * ECHO_PIECE_CHARS - 1``; shorter pieces are caught
when they hold one of the value's aligned blocks). A notification whose values cannot be read
(valid JSON nested deeper than the parsers read) could be repeated unseen: of an answer to it
only the status and content type are kept. Not caught: shorter values (a two-letter
name), shorter pieces of a long text, and data the target adds of its own that looks like none
of the above. What is shown (:func:`shown_answer`) is masked and bounded once more, for rows an
older version stored whole (their echoes can no longer be told: the masks still apply).

A WhatsApp Flow's answer (``interactive.nfm_reply.response_json``) is the form the user filled
in, as JSON inside a string: the string is a personal value, and so is each value of the form
(its keys are the Flow's own, so none can be told to be harmless), in each spelling it can take
(decoded, escaped once as inside the string, escaped twice as in the raw body); the reply's
``name`` ("flow") is its kind, not a person's. The masks reach
into JSON held in a string as well (``\\"name\\": \\"...\\"``), one level deep: as deep as Meta
nests it. Only answers that are not 2xx are read, so none of this costs a delivery anything.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

import orjson

__all__ = [
    "ECHO_PIECE_CHARS",
    "EXCERPT_CHARS",
    "MIN_ECHO_CHARS",
    "PERSONAL_KEYS",
    "kept_answer",
    "kept_words",
    "personal_values",
    "shown_answer",
]

EXCERPT_CHARS = 300
MIN_ECHO_CHARS = 4
ECHO_PIECE_CHARS = 12
MASK = "***"
_SCALARS = (str, int, float)
# Keys of Meta's payloads (and common ones) whose values are about a person: message text,
# numbers, ids and names (reference: WhatsApp webhook payloads, BSUIDs).
PERSONAL_KEYS = frozenset(
    {
        "address",
        "body",
        "caption",
        "city",
        "display_phone_number",
        "email",
        "first_name",
        "filename",
        "formatted_name",
        "from",
        "from_user_id",
        "last_name",
        "latitude",
        "longitude",
        "name",
        "parent_user_id",
        "phone",
        "recipient_id",
        "recipient_user_id",
        # A WhatsApp Flow's form as the user filled it in, JSON in a string (nfm_reply).
        "response_json",
        "street",
        "text",
        "title",
        "description",
        "user_id",
        "username",
        "wa_id",
        "zip",
    }
)
# Eight digits or more, single separators between them: phone numbers as people write them.
_DIGIT_RUN = re.compile(r"\+?\d(?:[ ().-]?\d){7,}")
# Starting only where a word starts: a long run with no "@" is read once, not once per letter.
_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_PERSONAL_PAIR = re.compile(
    r'("(?:' + "|".join(sorted(PERSONAL_KEYS)) + r')"\s*:\s*)("(?:[^"\\]|\\.)*"|[-\d.]+)'
)
# The same pair in JSON held in a JSON string (a Flow's response_json, a target quoting a body
# in an error field), where each quote is escaped: \"name\": \"Ana\". Inside its value, a run of
# backslashes before a quote is an escaped quote of the inner JSON when it is 3 long (or 7,
# 11...), the value's end when 1 (or 5, 9...: escaped backslashes, then the end); possessive,
# so a run is read whole, once.
_ESCAPED_PAIR = re.compile(
    r'((?<!\\)\\"(?:' + "|".join(sorted(PERSONAL_KEYS)) + r')\\"\s*:\s*)'
    r'(\\"(?:[^"\\]|\\++(?=[^"\\])|(?:\\{4})*+\\{3}"|(?:\\{4})++(?=\\"))*+\\"|[-\d.]+)'
)


def personal_values(body: bytes) -> set[str] | None:
    """The personal values of a notification (each at least :data:`MIN_ECHO_CHARS` long),
    as sent and as decoded (Meta escapes non-ASCII text as ``\\u00e4``); none for a body
    that is not JSON, and ``None`` for JSON that cannot be read (what it holds is unknown)."""
    try:
        payload = _parsed(body)
    except RecursionError:
        # Valid JSON nested deeper than either parser reads (the gateway accepts and forwards
        # it): its personal values cannot be told.
        return None
    if payload is _NOT_JSON:
        return set()
    found: set[str] = set()
    forms: list[str] = []
    # A loop over a stack, types compared exactly (the parsers make plain dicts and lists; a
    # bool is no number here): faster than recursive generators, isinstance() or a regular
    # expression over the raw text (bench/admin_costs.py), and no recursion limit.
    stack: list[tuple[object, object]] = [(payload, None)]
    push, pop = stack.append, stack.pop
    while stack:
        value, key = pop()
        kind = type(value)
        if kind is dict:
            if key == "nfm_reply":
                # Its name is the kind of reply ("flow", "address_message"), not a person's:
                # as one, any answer that mentions a flow would be an echo.
                items = value.items()  # type: ignore[attr-defined]
                value = {name: item for name, item in items if name != "name"}
            for name, item in value.items():  # type: ignore[attr-defined]
                push((item, name))
        elif kind is list:
            for item in value:  # type: ignore[attr-defined]
                push((item, key))
        elif key in PERSONAL_KEYS and kind in _SCALARS:
            text = str(value)  # a string, or a number (coordinates, a number sent unquoted)
            if len(text) >= MIN_ECHO_CHARS:
                found.add(text)
                if not text.isascii() or '"' in text or "\\" in text or not text.isprintable():
                    found.add(json.dumps(text)[1:-1])  # the escaped spelling, as Meta sent it
                if key == "response_json" and kind is str:
                    forms.append(text)
    try:
        for form in forms:
            _add_form_values(form, found)
    except RecursionError:
        return None  # a form nested deeper than the parsers read: its values are unknown
    return found


_NOT_JSON = object()


def _parsed(data: bytes | str) -> object:
    """``data`` parsed, or :data:`_NOT_JSON`; raises :class:`RecursionError` for valid JSON
    nested deeper than either parser reads."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            # What orjson refuses and Meta may sign: lone surrogates, and integers wider than
            # Python turns into an int (read as their text, which is what is compared).
            return json.loads(data, parse_int=str)
        except ValueError:
            return _NOT_JSON


def _add_form_values(form: str, found: set[str]) -> None:
    """Add to ``found`` every value of a Flow's form (``response_json``, JSON in a string),
    spelt as the user typed it, as the form's JSON writes it, and as the notification writes
    that JSON inside its own string (escaped twice). A form that is not JSON adds nothing: the
    whole string is a personal value already."""
    stack: list[object] = [_parsed(form)]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind is dict:
            stack.extend(value.values())  # type: ignore[attr-defined]
        elif kind is list:
            stack.extend(value)  # type: ignore[arg-type]
        elif kind in _SCALARS:
            text = str(value)
            if len(text) >= MIN_ECHO_CHARS:
                once = json.dumps(text)[1:-1]
                found.update((text, once, json.dumps(once)[1:-1]))


def _echoes(answer: str, values: set[str]) -> bool:
    """Whether ``answer`` holds a whole personal value of ``values``, or a piece of one: any
    piece of :data:`ECHO_PIECE_CHARS` * 2 - 1 characters or more holds one of the value's
    blocks of :data:`ECHO_PIECE_CHARS` (those starting at its multiples), which is what is
    looked for, so the cost grows with the values' length, not its square."""
    for value in values:
        if len(value) <= ECHO_PIECE_CHARS * 2:
            if value in answer:
                return True
            if len(value) <= ECHO_PIECE_CHARS:
                continue
        blocks = range(0, len(value) - ECHO_PIECE_CHARS + 1, ECHO_PIECE_CHARS)
        if any(value[i : i + ECHO_PIECE_CHARS] in answer for i in blocks):
            return True
    return False


def _masked(text: str) -> str:
    text = _PERSONAL_PAIR.sub(lambda match: f'{match.group(1)}"{MASK}"', text)
    if '\\"' in text:
        text = _ESCAPED_PAIR.sub(lambda match: f'{match.group(1)}\\"{MASK}\\"', text)
    if "@" in text:
        text = _EMAIL.sub(MASK, text)
    return _DIGIT_RUN.sub(MASK, text)


def kept_answer(body: bytes, status: int, content_type: str | None, answer: bytes) -> str:
    """What to keep of ``answer`` (the start of a target's answer, ``status`` and
    ``content_type`` its status and ``Content-Type``) to the request that carried ``body``."""
    if 200 <= status < 300:
        # Delivered: the status says all an operator needs, and nothing of the answer is
        # looked at (no cost on the delivery path, nothing it could repeat).
        return ""
    text = answer.decode("utf-8", "replace")
    if len(text) < MIN_ECHO_CHARS:
        return _masked(text)  # "ok", "{}", nothing: too short to repeat anything
    kind = (content_type or "no content type").split(";")[0].strip() or "no content type"
    return _kept(body, text, f"{kind}; ")


def kept_words(body: bytes, text: str) -> str:
    """What to keep of ``text``, an error a target worded itself (a NATS responder's reply
    that is no acknowledgement) to the request that carried ``body``: as :func:`kept_answer`
    keeps an HTTP target's answer that is not 2xx. Such a reply is kept as an attempt's error,
    shown and logged as it is, and a service answering on the subject can quote the message
    it was sent as an HTTP target can."""
    if len(text) < MIN_ECHO_CHARS:
        return _masked(text)
    # All that can be kept: the echo is looked for in it.
    return _kept(body, text[: EXCERPT_CHARS * 2], "")


def _kept(body: bytes, text: str, kind: str) -> str:
    """What to keep of ``text``, a target's words long enough to repeat something of ``body``:
    why nothing is (after ``kind``, the answer's content type and "; ", or nothing) when it
    does or when ``body`` cannot be read, else the text masked and cut to the excerpt's
    length."""
    values = personal_values(body)
    if values is None:
        return f"({kind}not kept: the notification cannot be read)"
    # An HTML page writes what it echoes with character references (I&#x27;m, &#227;): read
    # as the text they stand for too, or a text with such a character in every block of
    # ECHO_PIECE_CHARS would pass.
    if _echoes(text, values) or ("&" in text and _echoes(html.unescape(text), values)):
        return f"({kind}not kept: it repeats the notification)"
    shown = _masked(text[: EXCERPT_CHARS * 2])
    return shown if len(shown) <= EXCERPT_CHARS else shown[:EXCERPT_CHARS] + "..."


def shown_answer(kept: str | None) -> str | None:
    """``kept`` (what the outbox holds of an answer) as the console, the API and the CLI show
    it: masked and bounded again, for rows an older version stored whole. What
    :func:`kept_answer` made comes out unchanged."""
    if not kept:
        return kept
    shown = _masked(kept[: EXCERPT_CHARS * 2])
    return shown if len(shown) <= EXCERPT_CHARS + 3 else shown[:EXCERPT_CHARS] + "..."


def shown_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """A delivery's or an attempt's summary (``last_response``, ``response``) with the
    target's answer as :func:`shown_answer` shows it."""
    for key in ("last_response", "response"):
        if key in summary:
            summary[key] = shown_answer(summary[key])
    return summary
