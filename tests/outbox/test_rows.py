"""What both SQL backends share (gateway.outbox.rows): delivery ids, a row's state, and what an
outcome leaves in it."""

from __future__ import annotations

import pytest

from gateway.errors import OutboxError
from gateway.outbox.model import DeadLetter, Delivered, Outcome, RetryAt
from gateway.outbox.rows import delivery_id_of, rowid_of, state_of, stored_outcome


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
