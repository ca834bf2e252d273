"""Features that are off cost nothing: with tracing off, ``order = "none"``, no rate limit and
HTTP targets only, neither the request path nor the delivery path does their work.

Each test runs real notifications through a real gateway to the sink and watches for the work
itself: a module imported (no OpenTelemetry module means no span, not even a non-recording one,
and no call of its API), a conversation key computed, a token bucket made or taken from. Each
is paired with the feature on, so that the watch is shown to see the work when it is done.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from config_files import listen_port, write_config
from helpers import gateway_config, message_body, post, sink_target
from pki import Pki
from processes import post_to, serving, stop, until_listening
from sink import Sink

from gateway.config import Order
from gateway.delivery.ratelimit import TokenBucket
from gateway.edge import routing
from gateway.edge.ordering import conversation_key
from gateway.runtime.gateway import Gateway

# What a gateway with tracing off and HTTP targets only must never import: the OpenTelemetry
# API and SDK, the gateway's spans, and the broker drivers and their adapters.
_NOT_WHEN_OFF = ("opentelemetry", "redis", "nats", "gateway.tracing")
_BROKER_ADAPTERS = ("gateway.delivery.redis_stream", "gateway.delivery.nats_jetstream")


def _imported(output: str) -> set[str]:
    """The modules ``python -X importtime`` reported importing (its lines on standard error)."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in output.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def _forbidden(imported: set[str]) -> list[str]:
    return sorted(
        name
        for name in imported
        if name in _BROKER_ADAPTERS
        or any(name == top or name.startswith(top + ".") for top in _NOT_WHEN_OFF)
    )


async def test_a_gateway_without_tracing_or_brokers_imports_neither(
    pki: Pki, sink: Sink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve` with tracing off and one HTTP target acknowledges and delivers a notification
    without importing any OpenTelemetry module, the gateway's spans, or a broker driver."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    config = write_config(pki, tmp_path, target_url=sink.url("/sink"))
    with serving(config) as process:
        port = listen_port(config)
        await until_listening(port, process)
        assert await post_to(port, pki, message_body("features off")) == 200
        await sink.wait_for(1, "/sink")
        output = stop(process)
    imported = _imported(output)
    assert "gateway.edge.callback" in imported, output[-2000:]  # the report is the gateway's
    assert _forbidden(imported) == []


def test_the_import_watch_sees_opentelemetry_and_broker_modules() -> None:
    """The names the test above looks for are the ones ``-X importtime`` prints for them."""
    lines = "\n".join(
        f"import time:       100 |        200 | {'  ' * depth}{name}"
        for depth, name in enumerate(
            ["opentelemetry.trace", "gateway.tracing.spans", "redis", "gateway.delivery.forwarder"]
        )
    )
    assert _forbidden(_imported(lines)) == ["gateway.tracing.spans", "opentelemetry.trace", "redis"]


def _counting(calls: list[str], name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return func(*args, **kwargs)

    return counted


@pytest.mark.parametrize(("order", "keys"), [("none", 0), ("conversation", 2)])
async def test_a_conversation_key_is_computed_only_for_ordered_targets(
    pki: Pki,
    sink: Sink,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    order: Order,
    keys: int,
) -> None:
    """With ``order = "none"`` a notification routed to a catch-all and to a filtered target
    and delivered to both computes no conversation key; with ``"conversation"``, one each."""
    calls: list[str] = []
    monkeypatch.setattr(routing, "conversation_key", _counting(calls, "key", conversation_key))
    targets = [
        sink_target(sink, "all", order=order),
        sink_target(sink, "messages", order=order, fields=("messages",)),
    ]
    async with Gateway(gateway_config(pki, tmp_path, targets=targets, admin=False)) as gateway:
        assert (await post(gateway, pki, message_body("ordered or not"))).status == 200
        await sink.wait_for(1, "/all")
        await sink.wait_for(1, "/messages")
    assert len(calls) == keys


@pytest.mark.parametrize(("rate_per_s", "limited"), [(None, False), (1000.0, True)])
async def test_a_token_bucket_exists_only_for_rate_limited_targets(
    pki: Pki,
    sink: Sink,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    rate_per_s: float | None,
    limited: bool,
) -> None:
    """Without ``rate_per_s`` a delivered notification makes no token bucket and takes no
    token; with one, the delivery waited for a token."""
    calls: list[str] = []
    full, take = TokenBucket.full.__func__, TokenBucket.take  # type: ignore[attr-defined]
    monkeypatch.setattr(TokenBucket, "full", classmethod(_counting(calls, "full", full)))
    monkeypatch.setattr(TokenBucket, "take", _counting(calls, "take", take))
    target = sink_target(sink, rate_per_s=rate_per_s)
    async with Gateway(gateway_config(pki, tmp_path, targets=[target], admin=False)) as gateway:
        assert (await post(gateway, pki, message_body("limited or not"))).status == 200
        await sink.wait_for(1, "/sink")
    assert ("full" in calls and "take" in calls) is limited
    assert bool(calls) is limited
