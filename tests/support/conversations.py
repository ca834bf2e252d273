"""A target that tells conversations apart, and notifications that belong to one.

Rule: :class:`Conversations` is a real HTTP server on 127.0.0.1. It reads each request's user
(the business-scoped user id, ``from_user_id``) and number (the message's text) and records, per
user, the numbers it accepted (200), in arrival order. A message it is told to hold is answered
503 until released: a conversation whose first delivery keeps failing while others flow; one it
is told to fail is answered 503 that many times. ``before_answer``, when set, is awaited before
each 200 goes back (something to do while the gateway waits for the answer).

The notifications are Meta's published text message sample with the phone number fields
removed and business-scoped user id fields added (``examples/bsuid/messages-text.json``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Unpack

import pytest
from aiohttp import web
from helpers import TargetOptions
from sink import DEADLINE_S

from gateway.config import TargetConfig

__all__ = [
    "Conversations",
    "conversation_body",
    "conversations_target",
    "in_order",
    "ordered_bot",
]

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "bsuid" / "messages-text.json"


def conversation_body(user: str, n: int, *, run: str = "") -> bytes:
    """Message number ``n`` of user ``US.<user>``, with no phone number in it."""
    payload: Any = json.loads(SAMPLE.read_bytes())
    value = payload["entry"][0]["changes"][0]["value"]
    value["contacts"][0]["user_id"] = f"US.{user}"
    message = value["messages"][0]
    message["from_user_id"] = f"US.{user}"
    message["id"] = f"wamid.{run}{user}.{n}"
    message["text"]["body"] = str(n)
    return json.dumps(payload, separators=(",", ":")).encode()


def ordered_bot(target: Conversations, **options: Unpack[TargetOptions]) -> TargetConfig:
    """Target "bot", delivering to ``target`` in order per conversation, with ``options``:
    quick retries (waits of 50 to 100 ms) unless they give a retry schedule of their own."""
    settings = TargetOptions(url=target.url(), order="conversation")
    if "retry_schedule_s" not in options:
        settings.update(TargetOptions(wait_initial_s=0.05, wait_max_s=0.1))
    settings.update(options)
    return TargetConfig(name="bot", **settings)


def _read(body: bytes) -> tuple[str, int]:
    value = json.loads(body)["entry"][0]["changes"][0]["value"]
    message = value["messages"][0]
    return message["from_user_id"].removeprefix("US."), int(message["text"]["body"])


def in_order(numbers: Iterable[int]) -> bool:
    """Whether numbers arrived in order; a number sent again right after itself (at-least-once:
    a gateway killed between the target's answer and its record) is in order."""
    seen = list(numbers)
    return all(a <= b for a, b in itertools.pairwise(seen))


class Conversations:
    def __init__(self) -> None:
        self.accepted: dict[str, list[int]] = {}
        self.refused: dict[tuple[str, int], int] = {}
        self.held: set[tuple[str, int]] = set()
        self.failing: dict[tuple[str, int], int] = {}
        self.before_answer: Callable[[str, int], Awaitable[None]] | None = None
        self.port = 0
        self._runner: web.AppRunner | None = None

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/conversations"

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_post("/conversations", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port or self.port, reuse_address=True)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        user, n = _read(await request.read())
        if self.failing.get((user, n), 0) > 0:
            self.failing[(user, n)] -= 1
            self.refused[(user, n)] = self.refused.get((user, n), 0) + 1
            return web.Response(status=503, text="not yet")
        if (user, n) in self.held:
            self.refused[(user, n)] = self.refused.get((user, n), 0) + 1
            return web.Response(status=503, text="not now")
        self.accepted.setdefault(user, []).append(n)
        if self.before_answer is not None:
            await self.before_answer(user, n)
        return web.Response(text="ok")

    async def wait_for(self, user: str, count: int) -> list[int]:
        """Once ``count`` distinct numbers of ``user`` are accepted: all it accepted."""
        deadline = time.monotonic() + DEADLINE_S * 2
        while len(set(self.accepted.get(user, []))) < count:
            if time.monotonic() > deadline:
                got = sorted(set(self.accepted.get(user, [])))
                raise AssertionError(f"user {user}: accepted {got}, expected {count}")
            await asyncio.sleep(0.01)
        return self.accepted[user]

    async def wait_refused(self, user: str, n: int, times: int) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while self.refused.get((user, n), 0) < times:
            assert time.monotonic() < deadline, f"{user} {n} refused {self.refused}"
            await asyncio.sleep(0.01)


@pytest.fixture(name="target")
async def conversations_target() -> AsyncIterator[Conversations]:
    """A started :class:`Conversations`, stopped after the test: the fixture ``target`` of the
    modules that import this."""
    conversations = Conversations()
    await conversations.start()
    yield conversations
    await conversations.stop()
