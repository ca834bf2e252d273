"""What both SQL backends share (gateway.outbox.rows): delivery ids, a row's state, and what an
outcome leaves in it."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from gateway.errors import OutboxError
from gateway.outbox.model import (
    DeadLetter,
    Delivered,
    Delivery,
    Outcome,
    RetryAt,
    Route,
    made,
)
from gateway.outbox.rows import (
    delivery_from_row,
    delivery_id_of,
    rowid_of,
    rowids_named,
    state_of,
    stored_outcome,
)

# One value per field of Delivery, none equal to another, none a default.
_FIELDS: dict[str, Any] = {
    "id": "ab12-7",
    "notification_id": 3,
    "target": "crm",
    "body": b'{"entry": []}',
    "signature": "sha256=00",
    "split": True,
    "state": "dead",
    "attempts": 4,
    "created_at": 10.0,
    "next_attempt_at": 11.0,
    "received_at": 9.0,
    "last_status": 503,
    "last_error": "status 503",
    "last_response": "busy",
    "order_key": "k",
    "behind": True,
    "trace": "00-trace",
    "held_s": 2.5,
}


@pytest.mark.parametrize("state", ["pending", "delivered", "dead"])
def test_the_three_stored_states_read_as_themselves(state: str) -> None:
    """Each state a backend writes reads back as the same State value."""
    assert state_of(state) == state


@pytest.mark.parametrize("value", ["Pending", "sent", "", None, 1])
def test_a_state_no_backend_writes_is_an_outbox_error(value: object) -> None:
    """A row with any other state is refused loudly, naming the value."""
    with pytest.raises(OutboxError, match="unknown state"):
        state_of(value)


@pytest.mark.parametrize(
    ("delivery_id", "rowid"),
    [
        pytest.param(delivery_id_of("ab12", 7), 7, id="its own spelling"),
        pytest.param("ab12-007", None, id="leading zeros name nothing"),
        pytest.param("cd34-7", None, id="another store's id"),
        pytest.param("ab12-" + "9" * 20, None, id="beyond a row id"),
    ],
)
def test_a_delivery_id_names_a_row_only_in_its_own_spelling(
    delivery_id: str, rowid: int | None
) -> None:
    """rowid_of reads back only what delivery_id_of wrote for the same prefix."""
    assert rowid_of(delivery_id, "ab12") == rowid


@pytest.mark.parametrize(
    ("outcome", "stored"),
    [
        pytest.param(Delivered(), ("delivered", 100.0, None, 0.0), id="delivered"),
        pytest.param(
            RetryAt(160.0, "HTTP 503", 2.5), ("pending", 160.0, "HTTP 503", 2.5), id="retried"
        ),
        pytest.param(DeadLetter("HTTP 410"), ("dead", 100.0, "HTTP 410", 0.0), id="dead"),
    ],
)
def test_an_outcome_leaves_its_state_next_time_error_and_held_seconds_in_the_row(
    outcome: Outcome, stored: tuple[str, float, str | None, float]
) -> None:
    """Each outcome, recorded at 100.0, as both backends store it: only a retry is due again
    later and keeps its held seconds."""
    assert stored_outcome(outcome, 100.0) == stored


def test_made_makes_the_delivery_the_dataclass_would_make_field_for_field() -> None:
    """made() sets each field from its place in the values, as Delivery(**fields) does."""
    assert [field.name for field in dataclasses.fields(Delivery)] == list(_FIELDS)
    delivery = made(tuple(_FIELDS.values()))
    assert delivery == Delivery(**_FIELDS)
    assert {name: getattr(delivery, name) for name in _FIELDS} == _FIELDS
    assert hash(delivery) == hash(Delivery(**_FIELDS))


def test_a_made_delivery_is_as_frozen_as_any() -> None:
    """No field of a delivery made by made() can be set afterwards."""
    delivery = made(tuple(_FIELDS.values()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        delivery.state = "pending"  # type: ignore[misc]


def test_made_refuses_values_that_are_not_one_per_field() -> None:
    """Too few or too many values fail at once, rather than leave a field unset."""
    with pytest.raises(ValueError, match="zip"):
        made(tuple(_FIELDS.values())[:-1])
    with pytest.raises(ValueError, match="zip"):
        made((*_FIELDS.values(), None))


def test_a_row_reads_as_the_delivery_its_columns_name() -> None:
    """delivery_from_row: the seventeen columns in their order, the id spelled with the
    store's prefix, and ``behind`` false (said only of a delivery just accepted)."""
    row = (
        7,
        3,
        "crm",
        b'{"entry": []}',
        "sha256=00",
        1,
        "dead",
        4,
        10.0,
        11.0,
        9.0,
        503,
        "status 503",
        "busy",
        "k",
        "00-trace",
        2.5,
    )
    assert delivery_from_row(row, "ab12") == Delivery(**(_FIELDS | {"behind": False}))


def test_a_fresh_delivery_is_pending_as_accepted_one_per_route() -> None:
    """Delivery.fresh: one pending delivery per route, its own body for a split part, the
    notification's otherwise, behind as the backend found it."""
    routes = [Route("crm", None, "k"), Route("bot", b"part", None)]
    made_now = Delivery.fresh(
        ["p-1", "p-2"],
        routes,
        notification_id=3,
        body=b"whole",
        signature="sha256=00",
        now=5.0,
        behind={"p-1"},
        trace="00-trace",
    )
    common: dict[str, Any] = {
        "notification_id": 3,
        "signature": "sha256=00",
        "state": "pending",
        "attempts": 0,
        "created_at": 5.0,
        "next_attempt_at": 5.0,
        "received_at": 5.0,
        "trace": "00-trace",
    }
    assert made_now == [
        Delivery(
            id="p-1", target="crm", body=b"whole", split=False, order_key="k", behind=True, **common
        ),
        Delivery(
            id="p-2", target="bot", body=b"part", split=True, order_key=None, behind=False, **common
        ),
    ]


def test_the_row_ids_named_are_those_of_this_store_alone() -> None:
    """rowids_named keeps each key whose delivery id this store spelled, with its row id, and
    leaves out another store's id or no delivery id at all."""
    named = {"k1": delivery_id_of("ab12", 7), "k2": "cd34-8", "k3": "ab12-007", "k4": "ab12-9"}
    assert rowids_named(named, "ab12") == {"k1": 7, "k4": 9}
