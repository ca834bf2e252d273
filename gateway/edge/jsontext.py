"""Whether bytes are one JSON text, at any depth and any number width, without building it.

Rule: pure checks that decide validity only and never return the values. :func:`is_json` has
an explicit stack (no recursion), for the bodies the ``json`` module cannot read although they
are valid JSON (RFC 8259): nesting deeper than its recursion limit (about 1,000 levels), which
the RFC allows implementations to refuse but Meta's signature still vouches for.
:func:`surely_json` is the quick one-sided check of the ack path: ``True`` only for a body that
is JSON by every parser the gateway uses, ``False`` for "ask them".
"""

from __future__ import annotations

import re

import msgspec

__all__ = ["is_json", "surely_json"]

# msgspec skips what it is not asked to build, validating as it goes (structure, escapes, number
# grammar, control characters), with no object made: about a third of the instructions of
# orjson building the whole payload only to drop it. Its skip does not validate UTF-8, hence
# the check before it.
_SKIP = msgspec.json.Decoder(msgspec.Raw)


def surely_json(body: bytes) -> bool:
    """Whether ``body`` is certainly one UTF-8 JSON text that orjson or ``json`` reads.

    ``False`` means "not certainly": the caller asks its parsers, which decide. So a body this
    accepts is one the parsers accept (tests/edge/test_jsontext.py proves the implication on
    a table of edge cases, Meta's samples and generated bodies), and the bodies accepted in the
    end are the parsers' alone. Refused here and left to them: what msgspec refuses that
    ``json`` reads (a byte order mark, ``NaN``, a lone surrogate escape), nesting past msgspec's
    recursion limit, and any byte sequence that is not UTF-8.
    """
    if not body.isascii():  # ASCII is UTF-8; Meta escapes the rest, so this is the usual path
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            return False
    try:
        _SKIP.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return False
    return True


# RFC 8259 section 7 (strings: no raw control characters, the listed escapes) and section 6
# (numbers); section 2 (the four whitespace characters).
_STRING = re.compile(rb'"(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"')
_SCALAR = re.compile(
    rb'"(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"'
    rb"|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
    rb"|true|false|null"
)
_WHITESPACE = re.compile(rb"[ \t\n\r]*")


def _skip(body: bytes, at: int) -> int:
    match = _WHITESPACE.match(body, at)
    assert match is not None  # `*` matches the empty string
    return match.end()


def is_json(body: bytes) -> bool:
    """Whether ``body`` is exactly one UTF-8 JSON text, however deep.

    Does *not* check: duplicate object keys (allowed by the RFC), or encodings other than
    UTF-8 (Meta sends UTF-8; RFC 8259 section 8.1 requires it between systems).
    """
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    stack: list[int] = []  # b"{"[0] or b"["[0] for each open container
    at = _skip(body, 0)
    expecting_value = True
    while True:
        if expecting_value:
            if at >= len(body):
                return False
            char = body[at]
            if char in b"{[":
                stack.append(char)
                at = _skip(body, at + 1)
                closing = b"}" if char == ord("{") else b"]"
                if body[at : at + 1] == closing:
                    stack.pop()
                    at = _skip(body, at + 1)
                    expecting_value = False
                    continue
                if char == ord("{"):
                    at = _key(body, at)
                    if at < 0:
                        return False
                continue
            match = _SCALAR.match(body, at)
            if match is None:
                return False
            at = _skip(body, match.end())
            expecting_value = False
            continue
        if not stack:
            return at == len(body)
        top = stack[-1]
        char = body[at] if at < len(body) else -1
        if char == ord(","):
            at = _skip(body, at + 1)
            if top == ord("{"):
                at = _key(body, at)
                if at < 0:
                    return False
            expecting_value = True
        elif (top == ord("{") and char == ord("}")) or (top == ord("[") and char == ord("]")):
            stack.pop()
            at = _skip(body, at + 1)
        else:
            return False


def _key(body: bytes, at: int) -> int:
    """Past ``"key" :`` and the whitespace after it, or -1 when that is not there."""
    match = _STRING.match(body, at)
    if match is None:
        return -1
    at = _skip(body, match.end())
    if body[at : at + 1] != b":":
        return -1
    return _skip(body, at + 1)
