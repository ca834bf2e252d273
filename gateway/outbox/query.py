"""What a listing of deliveries may ask for: a state, a target and a limit, validated.

Rule: one reading of a deliveries query for the admin API and the command line alike, so both
refuse the same values with the same message (400 over HTTP, ``error:`` on the command line).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from gateway.errors import BadRequest
from gateway.outbox.model import STATES, State
from gateway.units import decimal

__all__ = ["MAX_LIMIT", "parse_query", "parse_state"]

MAX_LIMIT: Final = 1000


def parse_state(raw_state: str | None) -> State | None:
    if raw_state is None:
        return None
    state = next((known for known in STATES if known == raw_state), None)
    if state is None:
        raise BadRequest(f"state must be one of {', '.join(STATES)}")
    return state


def parse_query(query: Mapping[str, str]) -> tuple[State | None, str | None, int]:
    """``state``, ``target`` and ``limit`` from a deliveries query, validated."""
    state = parse_state(query.get("state"))
    limit = decimal(query.get("limit", "100"))
    if limit is None or not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return state, query.get("target"), limit
