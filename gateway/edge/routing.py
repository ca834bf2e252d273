"""Which targets get a notification, and in what shape.

Rule: routing is a pure function of the parsed payload and the target filters. A target receives
a notification when at least one change matches all of its filters (each filter matches when the
change's key is one of the listed values; an empty filter matches everything):

- ``fields`` by ``entry[].changes[].field``;
- ``waba_ids`` by ``entry[].id`` or ``value.waba_info.waba_id`` (partner ``account_update``
  events carry a business portfolio id in ``entry[].id``: meta-webhooks.md section 4);
- ``phone_number_ids`` by ``value.metadata.phone_number_id`` (never by the user's number, which
  business-scoped user ids may omit).

``split = "none"`` forwards the exact bytes received (``body=None`` here); ``split = "change"``
builds one minimal envelope per matching change. Envelopes are serialised with ASCII escapes, as
Meta does, so a target sees the same escaped text style; they are signed by the gateway, not Meta.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.config import TargetConfig
from gateway.errors import BadRequest
from gateway.outbox.model import Route

__all__ = ["Change", "Route", "iter_changes", "parse", "route"]


def parse(body: bytes) -> Any:
    """The payload of ``body``; raises :class:`BadRequest` (400) when it is not JSON.

    orjson first, three times faster on Meta's payloads than the standard library; what it
    refuses (a lone surrogate escape, NaN, a byte order mark) goes to ``json``, so the bodies
    accepted are exactly those the standard library accepts. One difference stays: an integer
    beyond 64 bits becomes a float (Meta's ids are strings; its numbers are timestamps).
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        raise BadRequest("body is not valid JSON") from exc


@dataclass(frozen=True, slots=True)
class Change:
    """One ``entry[].changes[]`` item with the keys routing needs."""

    entry_id: str | None
    entry_time: Any
    has_time: bool
    field: str | None
    waba_id: str | None
    phone_number_id: str | None
    raw: Any


def _str_or_none(value: Any) -> str | None:
    # Ids are strings in Meta's payloads; tolerate numbers so a filter still matches.
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


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
            if not isinstance(change, dict):
                continue
            value = change.get("value")
            value = value if isinstance(value, dict) else {}
            metadata = value.get("metadata")
            waba_info = value.get("waba_info")
            yield Change(
                entry_id=_str_or_none(entry.get("id")),
                entry_time=entry.get("time"),
                has_time="time" in entry,
                field=_str_or_none(change.get("field")),
                waba_id=_str_or_none(waba_info.get("waba_id"))
                if isinstance(waba_info, dict)
                else None,
                phone_number_id=_str_or_none(metadata.get("phone_number_id"))
                if isinstance(metadata, dict)
                else None,
                raw=change,
            )


def _matches(change: Change, target: TargetConfig) -> bool:
    if target.fields and change.field not in target.fields:
        return False
    if target.waba_ids and not (
        change.entry_id in target.waba_ids or change.waba_id in target.waba_ids
    ):
        return False
    return not (target.phone_number_ids and change.phone_number_id not in target.phone_number_ids)


def _has_filters(target: TargetConfig) -> bool:
    return bool(target.fields or target.waba_ids or target.phone_number_ids)


def _takes_all(target: TargetConfig) -> bool:
    """Whether ``target`` receives every notification as Meta sent it, whatever its changes."""
    return target.split == "none" and not _has_filters(target)


def _envelope(payload: dict[str, Any], change: Change) -> bytes:
    entry: dict[str, Any] = {"id": change.entry_id}
    if change.has_time:
        entry["time"] = change.entry_time
    entry["changes"] = [change.raw]
    document = {"object": payload.get("object"), "entry": [entry]}
    return json.dumps(document, ensure_ascii=True, separators=(",", ":")).encode()


def route(payload: Any, targets: Sequence[TargetConfig]) -> list[Route]:
    """The requests to make for ``payload``, in target order.

    A target without filters and ``split = "none"`` receives every notification, even one whose
    shape is unknown: it was signed by Meta, and dropping it would lose it.
    """
    # Read the changes only for a target that looks at them: the usual catch-all target
    # (no filters, split = "none") does not.
    changes = [] if all(map(_takes_all, targets)) else list(iter_changes(payload))
    routes: list[Route] = []
    for target in targets:
        if _takes_all(target):
            routes.append(Route(target.name, None))
            continue
        matching = [c for c in changes if _matches(c, target)]
        if target.split == "none":
            if matching:
                routes.append(Route(target.name, None))
        elif isinstance(payload, dict):
            routes.extend(Route(target.name, _envelope(payload, c)) for c in matching)
    return routes
