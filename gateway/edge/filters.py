"""Content filters: which changes a target wants by what they hold, beside where they come from.

Rule: pure functions of one change's ``value`` and the target's ``message_types`` and
``statuses``. A filter that is empty matches every change, as ``fields``, ``waba_ids`` and
``phone_number_ids`` do; a filter that is set matches a change when one of its ``messages[]``
has one of the listed ``type``s (``message_types``), or one of its ``statuses[]`` one of the
listed ``status``es (``statuses``). A change without messages (or without statuses) matches no
such filter: a target that asks for failed statuses gets no account events. Unknown types and
statuses are values like any other (Meta adds new ones: meta-webhooks.md section 4).

What it does not do: look inside a message (a ``text`` body, an ``interactive`` reply's kind),
nor read anything personal; it reads ``type`` and ``status`` alone.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

__all__ = ["has_content_filters", "matches_content", "message_types", "statuses"]


def _kinds(value: Any, array: str, key: str) -> set[str]:
    """The string ``key`` of each object in ``value[array]``; anything else is skipped."""
    if not isinstance(value, dict):
        return set()
    items = value.get(array)
    if not isinstance(items, list):
        return set()
    return {
        item[key] for item in items if isinstance(item, dict) and isinstance(item.get(key), str)
    }


def message_types(value: Any) -> set[str]:
    """The ``type`` of each of the change's ``messages[]``."""
    return _kinds(value, "messages", "type")


def statuses(value: Any) -> set[str]:
    """The ``status`` of each of the change's ``statuses[]``."""
    return _kinds(value, "statuses", "status")


def has_content_filters(wanted_types: Collection[str], wanted_statuses: Collection[str]) -> bool:
    """Whether either content filter is set (so a change's value must be read)."""
    return bool(wanted_types or wanted_statuses)


def matches_content(
    value: Any, wanted_types: Collection[str], wanted_statuses: Collection[str]
) -> bool:
    """Whether a change's ``value`` passes both content filters (each empty one passes)."""
    if wanted_types and message_types(value).isdisjoint(wanted_types):
        return False
    return not (wanted_statuses and statuses(value).isdisjoint(wanted_statuses))
