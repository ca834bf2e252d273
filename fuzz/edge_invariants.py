"""The invariants the fuzz targets check on every input, importable without atheris.

Rule: for any bytes a client could send as a body, :func:`check_body` either finds every
invariant holding or raises AssertionError; any other exception is a defect (a crash that would
have answered 500). For any bytes a client could send on a connection, :func:`check_stream`
does the same for the HTTP/1.1 core: the events of one read are those of any cut into reads.
``tests/project/test_fuzz_invariants.py`` runs both on seeds in CI; ``run.sh`` runs either under
atheris' coverage-guided mutation for a bounded time.
"""

from __future__ import annotations

import json

from gateway.config import TargetConfig
from gateway.edge.http1 import Continue, Event, Http1, Limits, Refusal, Request
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


# The default head and URL limits; a body limit small enough for inputs to cross it. Inputs stay
# under the head limit (libFuzzer's -max_len), where no cut can change what the head counts.
STREAM_LIMITS = Limits(max_body_bytes=512)


def _events(pieces: list[bytes]) -> list[tuple[object, ...]]:
    http = Http1(STREAM_LIMITS, "/webhook")
    events: list[Event] = []
    for when, piece in enumerate(pieces):
        events += http.feed(piece, float(when))
    return [_seen(event) for event in events]


def _seen(event: Event) -> tuple[object, ...]:
    if isinstance(event, Request):
        return ("request", event.method, event.url, event.signature, event.keep_alive, event.body)
    if isinstance(event, Refusal):
        return ("refusal", event.error.status, str(event.error), event.method)
    assert isinstance(event, Continue)
    return ("continue",)


def check_stream(data: bytes) -> None:
    """Feed ``data`` in one read, cut in two where its first byte says, and a byte at a time:
    the same events each time, at most one refusal, and nothing after it."""
    assert len(data) < STREAM_LIMITS.max_head_bytes, "longer inputs are out of this check's scope"
    whole = _events([data])
    refusals = [index for index, seen in enumerate(whole) if seen[0] == "refusal"]
    assert refusals in ([], [len(whole) - 1]), whole
    cut = data[0] % (len(data) + 1) if data else 0
    assert _events([data[:cut], data[cut:]]) == whole
    assert _events([data[i : i + 1] for i in range(len(data))]) == whole
