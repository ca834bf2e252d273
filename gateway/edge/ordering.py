"""The conversation a change belongs to: the key that ``order = "conversation"`` keeps in order.

Rule: a pure function of one change. A change's conversation is its phone number id (the
business side) and its user (the customer side): the business-scoped user id when the change
carries one (``messages[].from_user_id``, ``contacts[].user_id``, ``statuses[].recipient_user_id``),
else the phone number (``messages[].from``, ``contacts[].wa_id``, ``statuses[].recipient_id``);
meta-webhooks.md section 4: "key a user by the BSUID when present, else by the phone number;
never require ``from``". A change with no user (account, template and phone-number events) is
keyed by its WABA id, so each account's management events stay in order among themselves.

The key is a digest, never the ids themselves: user ids and phone numbers are personal data,
and the key is stored beside each delivery and compared, never shown.

What it does not do: tie a BSUID to a phone number. A user whose notifications carry the phone
number in some and only the BSUID in others would have two keys; Meta sends the BSUID in every
webhook since 2026-03-31, so that happens only across that date.
"""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["conversation_key", "user_of"]

# (array, BSUID key, phone key): where a change names its user, in the order looked at.
_USER_PLACES = (
    ("messages", "from_user_id", "from"),
    ("statuses", "recipient_user_id", "recipient_id"),
    ("contacts", "user_id", "wa_id"),
)


def _first(value: dict[str, Any], array: str) -> dict[str, Any] | None:
    items = value.get(array)
    if isinstance(items, list) and items and isinstance(items[0], dict):
        return items[0]
    return None


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def user_of(value: Any) -> str | None:
    """The change's user: ``"u:" + BSUID`` when it carries one, else ``"p:" + phone number``;
    ``None`` when it names no user. (A message's own BSUID is preferred over its contact's,
    which names the same user.)"""
    if not isinstance(value, dict):
        return None
    phone = None
    for array, bsuid_key, phone_key in _USER_PLACES:
        item = _first(value, array)
        if item is None:
            continue
        bsuid = _text(item.get(bsuid_key))
        if bsuid is not None:
            return "u:" + bsuid
        phone = phone or _text(item.get(phone_key))
    if phone is not None:
        return "p:" + phone
    bsuid = _text(value.get("user_id"))  # user_id_update and its kin name the user at the top
    return None if bsuid is None else "u:" + bsuid


def conversation_key(value: Any, phone_number_id: str | None, waba_id: str | None) -> str:
    """The ordering key of a change with ``value``, received for ``phone_number_id`` under
    ``waba_id`` (the entry's id, or ``waba_info.waba_id``): a hex digest of the conversation."""
    user = user_of(value)
    if user is None:
        what = "w:" + (waba_id or "")
    else:
        what = f"c:{phone_number_id or waba_id or ''}\0{user}"
    return hashlib.sha256(what.encode("utf-8", "surrogatepass")).hexdigest()[:32]
