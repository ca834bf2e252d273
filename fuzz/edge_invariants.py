"""The invariants the fuzz target checks on every input, importable without atheris.

Rule: for any bytes a client could send as a body, :func:`check_body` either finds every
invariant holding or raises AssertionError; any other exception is a defect (a crash that would
have answered 500). ``tests/test_fuzz_invariants.py`` runs it on Meta's samples in CI; ``run.sh``
runs it under atheris' coverage-guided mutation for a bounded time.
"""

from __future__ import annotations

import json

from gateway.config import TargetConfig
from gateway.edge.jsontext import is_json
from gateway.edge.routing import iter_changes, parse, route
from gateway.errors import BadRequest, NestedTooDeep
from gateway.outbox import Route

TARGETS = (
    TargetConfig(name="all", url="http://127.0.0.1/all"),
    TargetConfig(name="messages", url="http://127.0.0.1/m", fields=("messages",)),
    TargetConfig(name="waba", url="http://127.0.0.1/w", waba_ids=("102290129340398",)),
    TargetConfig(name="split", url="http://127.0.0.1/s", split="change"),
)


def check_body(data: bytes) -> None:
    """Route ``data`` and check what must hold of the result."""
    try:
        routes = route(data, TARGETS)
    except BadRequest as refused:
        if isinstance(refused, NestedTooDeep):
            raise AssertionError("route never lets NestedTooDeep escape") from refused
        # A refusal is right only for what is not one UTF-8 JSON text.
        if _stdlib_reads(data) and _utf8(data):
            raise AssertionError("route refused a body the json module reads") from refused
        return
    # The catch-all target receives every accepted notification, as it was sent.
    assert routes[0] == Route("all", None)
    try:
        payload = parse(data)
    except NestedTooDeep:
        assert is_json(data)
        assert routes == [Route("all", None)]
        return
    changes = [c for c in iter_changes(payload)]
    parts = [r.body for r in routes if r.target == "split"]
    assert len(parts) == len(changes)
    for part in parts:
        assert part is not None
        document = json.loads(part)
        assert len(document["entry"]) == 1
        assert len(document["entry"][0]["changes"]) == 1


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _stdlib_reads(data: bytes) -> bool:
    try:
        json.loads(data)
    except (ValueError, RecursionError):
        return False
    return True
