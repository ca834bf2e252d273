"""Dead letters do not grow for ever: ``outbox.dead_retention_s`` removes old ones with a
warning line and a counter, never silently; and the outbox's size is a gauge."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from helpers import ExpiryCount, admin_get, gateway_config, metric
from pki import Pki

from gateway.admin.stats import Stats
from gateway.config import DispatcherConfig, OutboxConfig
from gateway.delivery.dispatcher import Dispatcher
from gateway.outbox import AttemptResult, DeadLetter, Route, open_outbox
from gateway.runtime.gateway import Gateway

DAY = 86400.0
SIG = "sha256=" + "0" * 64


async def test_old_dead_letters_expire_with_a_warning_and_a_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two dead letters past dead_retention_s and one inside it: the two are removed, one
    warning line says how many, and the observer counts them."""
    outbox = await open_outbox(OutboxConfig(path=tmp_path / "outbox.sqlite3"))
    try:
        made = []
        for n, when in enumerate((1.0, 2.0, 25 * DAY)):
            (delivery,) = await outbox.accept(b'{"n":%d}' % n, SIG, [Route("t", None)], when) or []
            await outbox.record_many(
                [(delivery.id, DeadLetter("HTTP 400"), AttemptResult(status=400))], when
            )
            made.append(delivery)
        counted = ExpiryCount()
        dispatcher = Dispatcher(
            outbox,
            [],
            DispatcherConfig(poll_interval_s=0.01),
            retention_s=7 * DAY,
            dead_retention_s=30 * DAY,
            clock=lambda: 31 * DAY,
            observer=counted,
        )
        with caplog.at_level(logging.WARNING, logger="gateway.delivery.dispatcher"):
            dispatcher.start()
            for _ in range(500):
                if counted.expired:
                    break
                await asyncio.sleep(0.01)
            await dispatcher.stop()
        assert counted.expired == 2
        assert [r.getMessage() for r in caplog.records] == [
            "removed 2 dead letters older than outbox.dead_retention_s (2.592e+06s)"
        ]
        assert await outbox.get(made[0].id) is None
        assert await outbox.get(made[2].id) is not None
    finally:
        await outbox.close()


def test_expired_dead_letters_are_a_counter_on_metrics() -> None:
    """waba_gateway_dead_letters_expired_total adds up what was removed."""
    stats = Stats()
    stats.dead_letters_expired(2)
    stats.dead_letters_expired(3)
    assert metric(stats.render().decode(), "waba_gateway_dead_letters_expired_total") == 5


async def test_metrics_show_the_outbox_size_on_disk(pki: Pki, tmp_path: Path) -> None:
    """/metrics has the SQLite outbox's size in bytes (file and write-ahead log)."""
    config = gateway_config(pki, tmp_path)
    async with Gateway(config) as gateway:
        text = (await admin_get(gateway, "/metrics")).text
        assert metric(text, "waba_gateway_outbox_size_bytes") > 0
        assert "waba_gateway_outbox_rows" not in text
