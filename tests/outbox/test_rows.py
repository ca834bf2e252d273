"""What both SQL backends share (gateway.outbox.rows): delivery ids and a row's state."""

from __future__ import annotations

import pytest

from gateway.errors import OutboxError
from gateway.outbox.rows import delivery_id_of, rowid_of, state_of


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
