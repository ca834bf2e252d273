"""Which targets get a notification, and in what shape.

Rule: routing is a pure function of the received bytes and the target filters. A target receives
a notification when at least one change matches all of its filters (each filter matches when the
change's key is one of the listed values; an empty filter matches everything):

- ``fields`` by ``entry[].changes[].field``;
- ``waba_ids`` by ``entry[].id`` or ``value.waba_info.waba_id`` (partner ``account_update``
  events carry a business portfolio id in ``entry[].id``: meta-webhooks.md section 4);
- ``phone_number_ids`` by ``value.metadata.phone_number_id`` (never by the user's number, which
  business-scoped user ids may omit);
- ``message_types`` and ``statuses`` by what the change holds (:mod:`gateway.edge.filters`).

A target with ``order = "conversation"`` has each route keyed by its conversation
(:mod:`gateway.edge.ordering`): a split route by its change, a whole notification by its first
change that matches the target's filters. Without it no key is computed. Ordering is no filter:
an unfiltered whole-body target receives a notification with no change to key (no entries, no
changes, an unknown shape, JSON too deep to read) all the same, keyed :data:`NO_CONVERSATION`.

``split = "none"`` forwards the exact bytes received (``body=None`` here); ``split = "change"``
sends each matching change as a complete payload of its own, ``{"object", "entry": [{"id",
"time"?, "changes": [change]}]}``, so a consumer that reads only ``entry[0].changes[0]`` (as
WhatsApp libraries do) still sees every change. Its values are the original text of the body,
never re-serialised: Meta's escapes (``\\u00e9``, ``\\/``, surrogate pairs), integers of any
width and key order reach the target as Meta sent them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from decimal import Decimal
from typing import Any

import orjson

from gateway.config import TargetConfig
from gateway.edge.filters import has_content_filters, matches_content
from gateway.edge.jsontext import is_json, surely_json
from gateway.edge.ordering import conversation_key
from gateway.errors import BadRequest, NestedTooDeep
from gateway.outbox.model import Route

__all__ = [
    "NO_CONVERSATION",
    "Change",
    "Plan",
    "Route",
    "iter_changes",
    "parse",
    "route",
    "split_changes",
]

# orjson reads an integer outside [-2**63, 2**64) as a float, silently; every such integer is
# written with at least 19 digits. Translating the body to "0" for digits and " " for the rest,
# then looking for 19 zeros, costs a fraction of orjson's parse, far less than a regular
# expression, and only a body holding such a run (in a number or in a string) pays for json.
_DIGITS = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_WIDE = b"0" * 19
# Python refuses to turn more than 4,300 digits into an int (a guard against quadratic time,
# sys.get_int_max_str_digits); such an integer is still valid JSON (RFC 8259 section 6 sets no
# limit), so it is kept exactly as a Decimal instead of being called invalid.
_INT_DIGITS_LIMIT = 4300


# The key of a notification that names no conversation, for an ordered target that receives it.
# Not None: in the outbox None means "no order to keep", so such notifications would overtake
# one another (a retried one behind the next), and each would make the dispatcher look at every
# conversation of the target. One key of their own keeps them in order among themselves and
# holds back no real conversation: conversation_key digests "w:..." or "c:...", never "n:".
NO_CONVERSATION = hashlib.sha256(b"n:").hexdigest()[:32]


def _exact_int(text: str) -> int | Decimal:
    return int(text) if len(text) <= _INT_DIGITS_LIMIT else Decimal(text)


def parse(body: bytes, *, exact: bool = True) -> Any:
    """The payload of ``body``, as the ``json`` module reads it; raises :class:`BadRequest` (400)
    when it is not JSON.

    orjson first, three times faster on Meta's payloads than the standard library; what it
    refuses (a lone surrogate escape, NaN, a byte order mark) goes to ``json``, so the bodies
    accepted are exactly those the standard library accepts. A body that may hold an integer
    orjson cannot represent goes to ``json`` too, so every value is exact. ``exact=False`` skips
    that look, for a caller that only needs to know whether the body is JSON.
    """
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    else:
        if not exact or _WIDE not in body.translate(_DIGITS):
            return payload
    try:
        return json.loads(body, parse_int=_exact_int)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        raise BadRequest("body is not valid JSON") from exc
    except RecursionError:  # nested deeper than json reads (about 1000 levels)
        raise _too_deep(body) from None


def _check(body: bytes) -> None:
    """Raises what :func:`parse` raises for ``body``, building no value for a body that is
    surely JSON (:func:`~gateway.edge.jsontext.surely_json`); the parsers decide the rest."""
    if not surely_json(body):
        parse(body, exact=False)


def _too_deep(body: bytes) -> BadRequest:
    # Valid JSON that is only too deep to read is not the sender's error: say which it is.
    if is_json(body):
        return NestedTooDeep("body is nested too deeply to read its changes")
    return BadRequest("body is not valid JSON")


@dataclass(frozen=True, slots=True)
class Change:
    """One ``entry[].changes[]`` item with the keys routing needs, and, from
    :func:`split_changes`, ``part``: the change alone in a complete payload."""

    entry_id: str | None
    field: str | None
    waba_id: str | None
    phone_number_id: str | None
    part: bytes | None = None
    # The change's value, read only by the content filters and the ordering key; it holds
    # personal data, so it is never part of a repr.
    value: Any = dataclass_field(default=None, compare=False, repr=False)

    def key(self) -> str:
        """The conversation this change belongs to (see :mod:`gateway.edge.ordering`)."""
        return conversation_key(self.value, self.phone_number_id, self.waba_id or self.entry_id)


def _str_or_none(value: Any) -> str | None:
    # Ids are strings in Meta's payloads; tolerate numbers so a filter still matches.
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _change(entry_id: Any, change: dict[str, Any], part: bytes | None = None) -> Change:
    value = change.get("value")
    value = value if isinstance(value, dict) else {}
    metadata = value.get("metadata")
    waba_info = value.get("waba_info")
    return Change(
        entry_id=_str_or_none(entry_id),
        field=_str_or_none(change.get("field")),
        waba_id=_str_or_none(waba_info.get("waba_id")) if isinstance(waba_info, dict) else None,
        phone_number_id=_str_or_none(metadata.get("phone_number_id"))
        if isinstance(metadata, dict)
        else None,
        part=part,
        value=value,
    )


def iter_changes(payload: Any) -> Iterator[Change]:
    """Every change in the envelope; anything that is not the documented shape is skipped."""
    if not isinstance(payload, dict):
        return
    entries = payload.get("entry")
    if not isinstance(entries, list):
        return
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        changes = entry.get("changes")
        if not isinstance(changes, list):
            continue
        for change in changes:
            if isinstance(change, dict):
                yield _change(entry.get("id"), change)


# -- split = "change": each change in a payload of its own, cut from the original text ----------

_DECODER = json.JSONDecoder(parse_int=_exact_int)
_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's four (RFC 8259 section 2)


class _Reader:
    """A cursor over a JSON text already known to be valid (:func:`parse` accepted it).

    It descends only into the objects and arrays that hold the changes; every other value is
    read by ``json`` as one piece, which gives both the value and where its text ends.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.at = self._skip(0)

    def _skip(self, at: int) -> int:
        match = _WHITESPACE.match(self.text, at)
        assert match is not None  # `*` matches the empty string
        return match.end()

    def peek(self) -> str:
        return self.text[self.at]

    def value(self) -> tuple[Any, str]:
        """The value at the cursor and its exact text; the cursor moves past it."""
        start = self.at
        value, end = _DECODER.raw_decode(self.text, start)
        self.at = self._skip(end)
        return value, self.text[start:end]

    def members(self) -> Iterator[str]:
        """The keys of the object at the cursor, in order. After each key the cursor is on its
        value, which the caller reads (``value``, ``members`` or ``elements``) before the next."""
        self.at = self._skip(self.at + 1)  # past "{"
        while self.peek() != "}":
            key, _ = self.value()
            self.at = self._skip(self.at + 1)  # past ":"
            yield key
            if self.peek() == ",":
                self.at = self._skip(self.at + 1)
        self.at = self._skip(self.at + 1)

    def elements(self) -> Iterator[None]:
        """Once for each element of the array at the cursor, with the cursor on it (see
        ``members``)."""
        self.at = self._skip(self.at + 1)  # past "["
        while self.peek() != "]":
            yield None
            if self.peek() == ",":
                self.at = self._skip(self.at + 1)
        self.at = self._skip(self.at + 1)


# What a loop skipping a valid JSON value has to see: each string whole (a bracket inside one is
# text), and each bracket.
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
_WIDE_TEXT = re.compile(r"[0-9]{19}")


class _DeepReader(_Reader):
    """A :class:`_Reader` for a text that ``json`` could not read at the caller's stack depth.
    It finds where an object or array ends with a loop, not a recursion, and reads it with
    orjson, whose limit (1,024 levels) is the same wherever it is called; ``json`` reads what
    orjson does not read exactly (see :func:`parse`), and raises ``RecursionError`` when it is
    still too deep. Slower than ``json`` alone: only the deep bodies pay for it."""

    def value(self) -> tuple[Any, str]:
        start = self.at
        if self.peek() not in "[{":
            # A scalar: no nesting, so json reads it at any depth.
            return super().value()
        depth = 0
        end = start
        for match in _TOKEN.finditer(self.text, start):
            kind = self.text[match.start()]
            if kind in "[{":
                depth += 1
            elif kind in "]}":
                depth -= 1
                if depth == 0:
                    end = match.end()
                    break
        text = self.text[start:end]
        self.at = self._skip(end)
        return _read_deep(text), text


def _read_deep(text: str) -> Any:
    if _WIDE_TEXT.search(text) is None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:  # too deep for it too, a lone surrogate, NaN...
            pass
    return _DECODER.decode(text)


@dataclass(slots=True)
class _Entry:
    # Each key read, in the order a dict of the entry would have (the first time a key is seen;
    # the last value wins, as with json): the text of "id" and "time", "" for "changes".
    keys: dict[str, str]
    entry_id: Any
    changes: list[tuple[Any, str]]  # each change and its text


def _read_entry(reader: _Reader) -> _Entry:
    entry = _Entry(keys={}, entry_id=None, changes=[])
    for key in reader.members():
        if key == "changes" and reader.peek() == "[":
            entry.changes = [reader.value() for _ in reader.elements()]
            entry.keys[key] = ""
            continue
        value, text = reader.value()
        if key == "changes":
            entry.changes = []  # not a list: no changes, as iter_changes reads it
        elif key == "id":
            entry.entry_id = value
        entry.keys[key] = text
    return entry


def _part(top: dict[str, str], entry: _Entry, change: str) -> bytes:
    """The payload of one change: Meta's own shape and key order, with the original text of the
    object, the entry's id and time, and the change."""
    members = []
    for key, text in entry.keys.items():
        if key == "changes":
            members.append(f'"changes":[{change}]')
        elif key in ("id", "time"):
            members.append(f'"{key}":{text}')
    pieces = []
    for key, text in top.items():
        if key == "entry":
            pieces.append('"entry":[{' + ",".join(members) + "}]")
        elif key == "object":
            pieces.append(f'"object":{text}')
    # Back to the bytes they came from: UTF-8 text round-trips exactly, lone surrogates too.
    return ("{" + ",".join(pieces) + "}").encode("utf-8", "surrogatepass")


def split_changes(body: bytes) -> list[Change]:
    """Every change in ``body`` (valid JSON, see :func:`parse`), each with its ``part``; the
    same changes, in the same order, as :func:`iter_changes` finds in the parsed body. Raises
    ``RecursionError`` when a value is nested deeper than both orjson and ``json`` read."""
    # Decoded as json.loads decodes bytes, so the text is the one parse() accepted.
    text = body.decode(json.detect_encoding(body), "surrogatepass")
    try:
        return _split(_Reader(text))
    except RecursionError:
        # json reads as deep as the stack leaves room for, so whether a body of about 1,000
        # levels splits would depend on who calls: read it again with a limit that does not.
        return _split(_DeepReader(text))


def _split(reader: _Reader) -> list[Change]:
    if reader.peek() != "{":
        return []
    top: dict[str, str] = {}  # the text of "object"; "" marks where "entry" comes
    entries: list[_Entry] = []
    for key in reader.members():
        if key == "entry" and reader.peek() == "[":
            entries = []
            for _ in reader.elements():
                if reader.peek() == "{":
                    entries.append(_read_entry(reader))
                else:
                    reader.value()
            top[key] = ""
            continue
        _, text = reader.value()
        if key == "entry":
            entries = []  # not a list: no changes
        top[key] = text
    return [
        _change(entry.entry_id, change, _part(top, entry, text))
        for entry in entries
        for change, text in entry.changes
        if isinstance(change, dict)
    ]


# -- routing --------------------------------------------------------------------------------------


def _matches(change: Change, target: TargetConfig) -> bool:
    if target.fields and change.field not in target.fields:
        return False
    if target.waba_ids and not (
        change.entry_id in target.waba_ids or change.waba_id in target.waba_ids
    ):
        return False
    if target.phone_number_ids and change.phone_number_id not in target.phone_number_ids:
        return False
    return matches_content(change.value, target.message_types, target.statuses)


def _has_filters(target: TargetConfig) -> bool:
    return bool(
        target.fields
        or target.waba_ids
        or target.phone_number_ids
        or has_content_filters(target.message_types, target.statuses)
    )


def _takes_all(target: TargetConfig) -> bool:
    """Whether ``target`` receives every notification as Meta sent it, whatever its changes,
    with no key to compute."""
    return target.split == "none" and target.order == "none" and not _has_filters(target)


def _unread_route(target: TargetConfig) -> Route | None:
    """The route of ``target`` for a notification with no change to read (none, or too deep to
    read): every unfiltered whole-body target receives it, ordered or not."""
    if target.split != "none" or _has_filters(target):
        return None
    key = NO_CONVERSATION if target.order == "conversation" else None
    return Route(target.name, None, key)


@dataclass(frozen=True, slots=True)
class Plan:
    """What routing needs to know of the targets, decided once per configuration (at start and
    at each reload) rather than for each notification: which targets take every notification
    unread, the routes of a notification when all of them do, and those of a notification
    with no change to read."""

    targets: tuple[TargetConfig, ...]
    takes_all: tuple[bool, ...]
    # Every target takes every notification: only whether the body is JSON matters.
    catch_all: tuple[Route, ...] | None
    splits: bool
    # A notification with no change (or none that can be read): the unfiltered whole-body
    # targets', in target order, keyed NO_CONVERSATION for the ordered ones.
    unread: tuple[Route, ...] = ()

    @classmethod
    def of(cls, targets: Sequence[TargetConfig]) -> Plan:
        takes_all = tuple(map(_takes_all, targets))
        return cls(
            targets=tuple(targets),
            takes_all=takes_all,
            # Routes are immutable: one tuple serves every notification.
            catch_all=tuple(Route(t.name, None) for t in targets) if all(takes_all) else None,
            splits=any(target.split == "change" for target in targets),
            unread=tuple(r for r in map(_unread_route, targets) if r is not None),
        )


def route(body: bytes, targets: Sequence[TargetConfig] | Plan) -> list[Route]:
    """The requests to make for the notification ``body``, in target order; raises
    :class:`BadRequest` (400) when it is not JSON. ``targets``: the configured targets, or the
    :class:`Plan` made of them once (the callback's, so no request decides it again).

    A target without filters and ``split = "none"`` receives every notification, even one whose
    shape is unknown: it was signed by Meta, and dropping it would lose it. ``order =
    "conversation"`` changes only the key of such a notification (:data:`NO_CONVERSATION`).
    That includes valid JSON nested deeper than the parser reads; the targets that filter or
    split do not receive such a body, since its changes cannot be read. What one target needs
    never changes what another receives: a body too deep to split but not to parse still goes
    to the whole-body targets whose filters it matches.
    """
    plan = targets if isinstance(targets, Plan) else Plan.of(targets)
    try:
        return _route(body, plan)
    except NestedTooDeep:
        return list(plan.unread)


def _route(body: bytes, plan: Plan) -> list[Route]:
    if plan.catch_all is not None:
        # The usual catch-all target reads no value: only whether the body is JSON matters,
        # so this path (the benchmarked one) builds no value at all.
        _check(body)
        return list(plan.catch_all)
    targets: Iterable[tuple[TargetConfig, bool]] = zip(plan.targets, plan.takes_all, strict=True)
    if plan.splits:
        # split_changes reads every value itself, with json: this only has to refuse non-JSON.
        # _check inlined: parse() then runs at the stack depth it has without split targets,
        # so a body json reads only just is read (or not) alike with and without them.
        if not surely_json(body):
            parse(body, exact=False)
        try:
            changes = split_changes(body)
        except RecursionError:
            # A change too deep to split (for orjson, or for json where only json reads it
            # exactly): the split targets alone go without it. The others are routed from
            # parse()'s reading, as without a split target; it raises NestedTooDeep when the
            # body cannot be read at all.
            changes = list(iter_changes(parse(body)))
            targets = [pair for pair in targets if pair[0].split == "none"]
        except ValueError as exc:  # what orjson accepts and json does not, if anything
            raise BadRequest("body is not valid JSON") from exc
    else:
        changes = list(iter_changes(parse(body)))
    if not changes:
        # Nothing to match or key: the unfiltered whole-body targets receive it (ordered ones
        # too, ordering is no filter), no other target does.
        return list(plan.unread)
    routes: list[Route] = []
    for target, all_ in targets:
        if all_:
            routes.append(Route(target.name, None))
            continue
        matching = [c for c in changes if _matches(c, target)]
        ordered = target.order == "conversation"
        if target.split == "none":
            if matching:
                routes.append(Route(target.name, None, matching[0].key() if ordered else None))
        elif ordered:
            routes.extend(Route(target.name, c.part, c.key()) for c in matching)
        else:
            routes.extend(Route(target.name, c.part) for c in matching)
    return routes
