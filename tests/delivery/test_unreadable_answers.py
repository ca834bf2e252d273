"""A target's answer to a notification the gateway cannot read (valid JSON nested deeper than
its parsers read, which it accepts and forwards to its catch-all targets): nothing of the
answer is kept, its status is, and every other delivery of the pipelined batch keeps its own
answer (gateway.delivery.answers, gateway.delivery.forwarder). Real sockets: the sink."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import gateway_config, meta_signature, post, sink_target, wait_for_state
from pki import Pki
from sink import Reply, Sink

from gateway.delivery.answers import kept_answer, personal_values
from gateway.delivery.backoff import RETRY_AFTER_LONGEST_S
from gateway.delivery.forwarder import Forwarder
from gateway.edge.routing import route
from gateway.outbox import Delivery, Route
from gateway.runtime.gateway import Gateway

# Deeper than orjson's 1,024 levels and json's limit, and the name of a person beside it.
DEEP = (
    b'{"object":"whatsapp_business_account","entry":[{"id":"W","changes":[{"field":"messages",'
    b'"value":{"contacts":[{"profile":{"name":"Ana Lima"}}],"deep":'
    + b"[" * 5000
    + b"]" * 5000
    + b"}}]}]}"
)
PLAIN = json.dumps(
    {"object": "whatsapp_business_account", "entry": [{"id": "W", "changes": []}]},
    separators=(",", ":"),
).encode()
UNREAD = "(text/html; not kept: the notification cannot be read)"


def _deliveries(bodies: list[bytes]) -> list[Delivery]:
    made: list[Delivery] = []
    for index, body in enumerate(bodies):
        made += Delivery.fresh(
            [f"unreadable-{index}"],
            [Route("t", None)],
            notification_id=index,
            body=body,
            signature=meta_signature(body),
            now=0.0,
        )
    return made


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"cannot read this body", id="an answer with nothing personal"),
        pytest.param(b"<p>hello Ana Lima</p>", id="an echo of the notification"),
        pytest.param(DEEP, id="the notification itself"),
        pytest.param(b"call +55 11 2222-3333", id="a phone number"),
    ],
)
def test_nothing_of_an_answer_to_a_notification_that_cannot_be_read_is_kept(
    answer: bytes,
) -> None:
    """Its personal values cannot be told, so neither can an echo of them: only the content
    type is kept (the status is kept beside it), never an excerpt, and nothing raises."""
    assert personal_values(DEEP) is None
    assert kept_answer(DEEP, 400, "text/html; charset=utf-8", answer) == UNREAD
    assert kept_answer(DEEP, 200, "text/html", answer) == ""  # delivered: nothing is read


def test_an_echo_is_still_caught_in_a_notification_with_an_integer_too_wide_for_python() -> None:
    """Valid JSON that orjson refuses and json reads only as text (over 4,300 digits) is read:
    an answer repeating a name in it is not kept."""
    body = b'{"entry":[{"changes":[{"value":{"n":' + b"9" * 5000 + b',"name":"Ana Lima"}}]}]}'
    assert personal_values(body) == {"Ana Lima"}
    assert kept_answer(body, 422, "text/plain", b"hello Ana Lima") == (
        "(text/plain; not kept: it repeats the notification)"
    )


async def test_each_pipelined_delivery_keeps_its_answer_beside_one_that_cannot_be_read(
    sink: Sink,
) -> None:
    """Three deliveries pipelined on one connection, the middle one the deep body: each gets
    the status the target gave it, with what is kept of its answer."""
    assert route(DEEP, [sink_target(sink)]) == [Route("sink", None)]  # the gateway forwards it
    sink.script(
        Reply(200, body="ok"),
        Reply(400, headers={"Content-Type": "text/html"}, body="<p>hello Ana Lima</p>"),
        Reply(503, headers={"Retry-After": "7"}, body="busy, try later"),
    )
    forwarder = Forwarder(sink_target(sink, "t"))
    try:
        results = await forwarder.send_many(_deliveries([PLAIN, DEEP, PLAIN]), [1, 1, 1])
    finally:
        await forwarder.close()
    assert [r.status for r in results] == [200, 400, 503]
    assert [r.response_excerpt for r in results] == ["", UNREAD, "busy, try later"]
    assert results[2].retry_after_s == 7.0
    assert len(sink.received) == 3


async def test_a_retry_after_longer_than_a_number_reads_as_the_longest_wait(
    sink: Sink,
) -> None:
    """A Retry-After of more digits than Python turns into an int used to make reading the
    answer fail, and the 429 lost what it said: it is now the longest wait (a retry that
    max_age_s turns into a dead letter), and the answer is kept as any other. The batch's
    other deliveries keep theirs."""
    sink.script(
        Reply(429, headers={"Retry-After": "9" * 5000}, body="slow down"),
        Reply(400, body="bad request"),
    )
    forwarder = Forwarder(sink_target(sink, "t"))
    try:
        results = await forwarder.send_many(_deliveries([PLAIN, PLAIN]), [1, 1])
    finally:
        await forwarder.close()
    assert [(r.status, r.response_excerpt, r.retry_after_s) for r in results] == [
        (429, "slow down", RETRY_AFTER_LONGEST_S),
        (400, "bad request", None),
    ]


async def test_a_400_to_a_notification_that_cannot_be_read_is_a_dead_letter_at_once(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """End to end: the gateway takes the deep notification (200 to Meta), its target refuses it
    with a 400, which is not retryable: one attempt, then a dead letter that says HTTP 400 and
    keeps nothing of the answer."""
    sink.default = Reply(400, headers={"Content-Type": "text/html"}, body="<p>Ana Lima?</p>")
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink, attempts=3)])
    async with Gateway(config) as gateway:
        assert (await post(gateway, pki, DEEP)).status == 200
        (dead,) = await wait_for_state(gateway, "dead")
    assert dead.last_status == 400, dead.last_error
    assert dead.attempts == 1, dead.last_error
    assert dead.last_response == UNREAD
    assert len(sink.received) == 1
