"""Meta's GET verification handshake decision (gateway.edge.handshake)."""

from __future__ import annotations

import pytest

from gateway.edge.handshake import answer_challenge
from gateway.errors import BadRequest, Forbidden, Rejected

TOKENS = ["app-token", "override-token"]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (
            {
                "hub.mode": "subscribe",
                "hub.challenge": "1158201444",
                "hub.verify_token": "app-token",
            },
            "1158201444",
        ),
        (
            {
                "hub.mode": "subscribe",
                "hub.challenge": "abc 123",
                "hub.verify_token": "override-token",
            },
            "abc 123",
        ),
        ({"hub.mode": "subscribe", "hub.challenge": "007", "hub.verify_token": "app-token"}, "007"),
    ],
    ids=["numeric", "string-second-token", "leading-zeros-kept"],
)
def test_echoes_challenge_verbatim_for_matching_token(
    params: dict[str, str], expected: str
) -> None:
    """The challenge comes back exactly as sent, never parsed."""
    assert answer_challenge(params, TOKENS) == expected


@pytest.mark.parametrize(
    ("params", "error", "status"),
    [
        (
            {"hub.mode": "subscribe", "hub.challenge": "1", "hub.verify_token": "nope"},
            Forbidden,
            403,
        ),
        (
            {"hub.mode": "subscribe", "hub.challenge": "1", "hub.verify_token": "app-toke"},
            Forbidden,
            403,
        ),
        ({"hub.mode": "subscribe", "hub.challenge": "1", "hub.verify_token": ""}, Forbidden, 403),
        (
            {"hub.mode": "unsubscribe", "hub.challenge": "1", "hub.verify_token": "app-token"},
            BadRequest,
            400,
        ),
        ({"hub.challenge": "1", "hub.verify_token": "app-token"}, BadRequest, 400),
        ({"hub.mode": "subscribe", "hub.verify_token": "app-token"}, BadRequest, 400),
        ({"hub.mode": "subscribe", "hub.challenge": "1"}, BadRequest, 400),
        ({}, BadRequest, 400),
    ],
    ids=["wrong", "prefix", "empty", "bad-mode", "no-mode", "no-challenge", "no-token", "nothing"],
)
def test_rejects_wrong_token_or_missing_parameters(
    params: dict[str, str], error: type[Rejected], status: int
) -> None:
    """Wrong tokens are 403, missing or bad parameters 400."""
    with pytest.raises(error) as info:
        answer_challenge(params, TOKENS)
    assert info.value.status == status
