"""Meta's GET verification handshake (whatsapp/webhooks/create-webhook-endpoint).

Rule: echo ``hub.challenge`` verbatim when ``hub.mode`` is ``subscribe`` and ``hub.verify_token``
equals one of the configured tokens; never parse the challenge (Meta's pages call it an int in one
place and a string in another). The GET carries no signature, so none is demanded.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence

from gateway.errors import BadRequest, Forbidden

__all__ = ["answer_challenge"]

_REQUIRED = ("hub.mode", "hub.challenge", "hub.verify_token")


def answer_challenge(params: Mapping[str, str], verify_tokens: Sequence[str]) -> str:
    """Return the challenge to echo, or raise.

    :class:`BadRequest` (400) when a parameter is missing or ``hub.mode`` is not ``subscribe``;
    :class:`Forbidden` (403) when the token matches none of ``verify_tokens``. Tokens are compared
    in constant time, all of them, so timing does not reveal a prefix or which token is live.
    """
    missing = [name for name in _REQUIRED if name not in params]
    if missing:
        raise BadRequest(f"missing query parameter(s): {', '.join(missing)}")
    if params["hub.mode"] != "subscribe":
        raise BadRequest("hub.mode must be 'subscribe'")
    presented = params["hub.verify_token"].encode()
    matched = False
    for token in verify_tokens:
        matched |= hmac.compare_digest(token.encode(), presented)
    if not matched:
        raise Forbidden("hub.verify_token does not match")
    return params["hub.challenge"]
