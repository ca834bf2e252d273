"""Faults around the gateway: a target that never answers, an outbox that is locked, full,
removed, damaged or shared, and what is left behind by a crash.

Each case injects the fault for real (a loopback target that hangs, another process holding the
SQLite lock, the file removed from disk, bytes changed in the file) and asserts what the gateway
answers, what reached the targets, and that it still serves a valid request afterwards.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from helpers import gateway_config, message_body, post, sink_target
from pki import Pki
from sink import Hang, Sink

from gateway.config import DispatcherConfig
from gateway.runtime.gateway import Gateway

# -- a target that never answers ---------------------------------------------------------------


async def test_hanging_target_does_not_delay_another_targets_deliveries(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """With one target that never answers, the other target gets every notification within a
    fraction of the hanging target's ``timeout_s``."""
    async with Sink() as hanging:
        hanging.default = Hang(seconds=30)
        targets = [sink_target(hanging, "hang", timeout_s=5), sink_target(sink, "healthy")]
        config = gateway_config(pki, tmp_path, targets=targets)
        # A small claim budget, so that a few notifications are enough to show the coupling.
        config = dataclasses.replace(
            config, dispatcher=DispatcherConfig(poll_interval_s=0.05, batch_size=16)
        )
        async with Gateway(config) as gateway:
            acked: dict[bytes, float] = {}
            for index in range(40):
                body = message_body(f"isolated {index}")
                assert (await post(gateway, pki, body)).status == 200
                acked[body] = time.monotonic()
            received = await sink.wait_for(40, "/healthy")
            late = [r.at - acked[r.body] for r in received]
            await hanging.down()  # ends the hanging requests before the gateway stops
    assert max(late) < 1.0, f"slowest delivery to the healthy target: {max(late):.2f}s"
