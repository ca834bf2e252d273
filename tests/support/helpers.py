"""What the end-to-end tests share: a test configuration, Meta-like requests, and waiting.

Rule: nothing here replaces gateway code. The configuration is a real :class:`Config`, requests
go over real mTLS with the certificates from ``pki``, and the outbox is read through the running
gateway's own :class:`~gateway.outbox.Outbox`. Waiting polls with a generous deadline and returns
as soon as the condition holds; no test asserts that anything is fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import io
import json
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, TypeVar, Unpack

import aiohttp
from pki import ClientKind, Pki
from sink import DEADLINE_S, Sink

from gateway.config import (
    AdminConfig,
    ClientAuth,
    Config,
    DispatcherConfig,
    ListenConfig,
    MetaConfig,
    Order,
    OutboxConfig,
    Signature,
    Split,
    TargetConfig,
    TargetKind,
)
from gateway.outbox import Delivery, State
from gateway.runtime.gateway import Gateway

__all__ = [
    "APP_SECRET",
    "DATA",
    "REFUSED",
    "VERIFY_TOKEN",
    "Answer",
    "ConfigOptions",
    "ExpiryCount",
    "OpenOptions",
    "TargetOptions",
    "admin_get",
    "admin_post",
    "bodies_in_file",
    "damage_page",
    "deliveries",
    "eventually",
    "gateway_config",
    "handshake",
    "message_body",
    "meta_signature",
    "metric",
    "post",
    "quick",
    "read_message",
    "sink_target",
    "stored_bodies",
    "wait_for_state",
]

T = TypeVar("T")

APP_SECRET = "test-app-secret"
VERIFY_TOKEN = "test-verify-token"
DATA = Path(__file__).resolve().parents[1] / "data"
WABA_ID = "102290129340398"
PHONE_NUMBER_ID = "106540352242922"


class ExpiryCount:
    """A delivery observer that adds up the dead letters it is told expired (and ignores the
    attempts it is told of)."""

    def __init__(self) -> None:
        self.expired = 0

    def attempted(self, target: str, outcome: str, latency_s: float | None) -> None:
        pass

    def dead_letters_expired(self, count: int) -> None:
        self.expired += count


# How a refused TLS handshake reaches an aiohttp client. Under TLS 1.3 the client's handshake
# completes before the server has judged the client certificate, so the refusal may only show
# as a reset or an empty read on the first request.
REFUSED = (
    aiohttp.ClientConnectorError,
    aiohttp.ClientOSError,
    aiohttp.ServerDisconnectedError,
    ssl.SSLError,
)


class TargetOptions(TypedDict, total=False):
    """What a test may set of a :class:`TargetConfig` besides its name (every key of it:
    ``test_target_options_are_the_target_settings`` keeps the two alike)."""

    url: str
    kind: TargetKind
    stream: str | None
    maxlen: int | None
    subject: str | None
    fields: tuple[str, ...]
    waba_ids: tuple[str, ...]
    phone_number_ids: tuple[str, ...]
    message_types: tuple[str, ...]
    statuses: tuple[str, ...]
    timeout_s: float
    attempts: int
    wait_initial_s: float
    wait_max_s: float
    wait_exp_base: float
    max_age_s: float
    retry_schedule_s: tuple[float, ...]
    split: Split
    secret: str | None
    signature: Signature
    concurrency: int
    pipeline: int
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None
    order: Order
    rate_per_s: float | None
    burst: int | None


def quick(**options: Unpack[TargetOptions]) -> TargetOptions:
    """``options`` with waits short enough for quick retries, unless they set their own."""
    settings = TargetOptions(wait_initial_s=0.05, wait_max_s=0.2)
    settings.update(options)
    return settings


def sink_target(sink: Sink, name: str = "sink", **options: Unpack[TargetOptions]) -> TargetConfig:
    """A target on the sink at path ``/<name>``, with waits short enough for quick retries."""
    settings = quick(url=sink.url(f"/{name}"))
    settings.update(options)
    return TargetConfig(name=name, **settings)


class ConfigOptions(TypedDict, total=False):
    """What :func:`gateway_config` takes besides its targets, for helpers that pass it on."""

    client_auth: ClientAuth
    app_secrets: Sequence[str]
    max_body_bytes: int | None
    admin_token: str | None
    admin_allowed_hosts: Sequence[str]
    host: str
    admin: bool


class OpenOptions(TypedDict, total=False):
    """What :func:`gateway.outbox.open_outbox` takes besides the configuration."""

    on_commit: Callable[[int], None] | None
    create: bool
    dispatching: bool
    on_wake: Callable[[], None] | None
    on_replay: Callable[[str | None], None] | None


def gateway_config(
    pki: Pki,
    tmp_path: Path,
    *,
    targets: Sequence[TargetConfig] = (),
    client_auth: ClientAuth = "required",
    app_secrets: Sequence[str] = (APP_SECRET,),
    max_body_bytes: int | None = None,
    admin_token: str | None = None,
    admin_allowed_hosts: Sequence[str] = (),
    host: str = "127.0.0.1",
    admin: bool = True,
) -> Config:
    """The listener on a free port of ``host`` and (unless ``admin`` is false) the admin
    listener on a free loopback port; the outbox under ``tmp_path``. The one configuration
    helper of the in-process tests."""
    # One process: the in-process Gateway is one worker, which also runs the dispatcher.
    listen = ListenConfig(host=host, port=0, workers=1)
    if max_body_bytes is not None:
        listen = dataclasses.replace(listen, max_body_bytes=max_body_bytes)
    return Config(
        listen=listen,
        tls=pki.tls_config(client_auth=client_auth),
        meta=MetaConfig(verify_tokens=(VERIFY_TOKEN,), app_secrets=tuple(app_secrets)),
        outbox=OutboxConfig(path=tmp_path / "outbox.sqlite3"),
        targets=tuple(targets),
        admin=AdminConfig(
            host="127.0.0.1",
            port=0,
            token=admin_token,
            enabled=admin,
            allowed_hosts=tuple(admin_allowed_hosts),
        ),
        dispatcher=DispatcherConfig(poll_interval_s=0.05),
    )


def meta_signature(body: bytes, secret: str = APP_SECRET) -> str:
    """``X-Hub-Signature-256`` as Meta computes it: HMAC-SHA256 of the raw bytes, lowercase."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def message_body(
    text: str, *, phone_number_id: str = PHONE_NUMBER_ID, waba_id: str = WABA_ID
) -> bytes:
    """A one-message ``messages`` notification, escaped as Meta escapes it (ASCII only)."""
    payload = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": waba_id,
                "changes": [
                    {
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": "15550783881",
                                "phone_number_id": phone_number_id,
                            },
                            "messages": [
                                {
                                    "from": "16505551234",
                                    "id": "wamid." + hashlib.sha256(text.encode()).hexdigest(),
                                    "timestamp": "1749416383",
                                    "type": "text",
                                    "text": {"body": text},
                                }
                            ],
                        },
                        "field": "messages",
                    }
                ],
            }
        ],
    }
    return json.dumps(payload, ensure_ascii=True, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Answer:
    """What the gateway answered."""

    status: int
    text: str
    content_type: str


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def _request(
    method: str,
    url: str,
    context: ssl.SSLContext | None,
    *,
    params: Mapping[str, str] | None = None,
    data: bytes | None = None,
    chunk_size: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> Answer:
    body: io.BytesIO | AsyncIterator[bytes] | None = None
    if data is not None and chunk_size is not None:
        body = _chunks(data, chunk_size)  # chunked transfer encoding: no Content-Length
    elif data is not None:
        # A file-like body: aiohttp warns that raw bytes over 1 MiB might block the loop.
        body = io.BytesIO(data)
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            url,
            params=params,
            data=body,
            headers=headers,
            # No context: the plain-HTTP admin listener, where TLS settings do not apply.
            ssl=context if context is not None else True,
        ) as response,
    ):
        return Answer(response.status, await response.text(), response.content_type)


async def post(
    gateway: Gateway,
    pki: Pki,
    body: bytes,
    *,
    secret: str | None = APP_SECRET,
    signature: str | None = None,
    kind: ClientKind = "meta",
    headers: Mapping[str, str] | None = None,
    chunk_size: int | None = None,
) -> Answer:
    """POST ``body`` to the callback over mTLS as ``kind``, signed as Meta signs it.

    ``secret=None`` sends no ``X-Hub-Signature-256``; ``signature`` sends that exact value;
    ``chunk_size`` sends the body in chunks of that size, without a ``Content-Length``.
    """
    sent = {"Content-Type": "application/json"}
    if signature is not None:
        sent["X-Hub-Signature-256"] = signature
    elif secret is not None:
        sent["X-Hub-Signature-256"] = meta_signature(body, secret)
    sent |= headers or {}
    url = f"https://localhost:{gateway.port}{gateway.config.listen.path}"
    context = pki.client_context(kind)
    return await _request("POST", url, context, data=body, chunk_size=chunk_size, headers=sent)


async def handshake(
    gateway: Gateway, pki: Pki, params: Mapping[str, str], *, kind: ClientKind = "meta"
) -> Answer:
    """Meta's verification GET with the query ``params``."""
    url = f"https://localhost:{gateway.port}{gateway.config.listen.path}"
    return await _request("GET", url, pki.client_context(kind), params=params)


async def admin_get(
    gateway: Gateway, path: str, *, headers: Mapping[str, str] | None = None
) -> Answer:
    return await _request(
        "GET", f"http://127.0.0.1:{gateway.admin_port}{path}", None, headers=headers
    )


async def admin_post(
    gateway: Gateway, path: str, *, headers: Mapping[str, str] | None = None
) -> Answer:
    return await _request(
        "POST", f"http://127.0.0.1:{gateway.admin_port}{path}", None, headers=headers
    )


def metric(text: str, sample: str) -> float:
    """The value of ``sample`` (a name, with its labels if it has any) in a /metrics text."""
    (line,) = [line for line in text.splitlines() if line.startswith(sample + " ")]
    return float(line.split()[1])


async def deliveries(
    gateway: Gateway, *, state: State | None = None, target: str | None = None
) -> list[Delivery]:
    """The gateway's deliveries as its outbox holds them, newest first."""
    return await gateway.outbox.query(state=state, target=target)


async def wait_for_state(
    gateway: Gateway, state: State, count: int = 1, *, target: str | None = None
) -> list[Delivery]:
    """At least ``count`` deliveries in ``state`` (to ``target``), as soon as they are there."""

    async def probe() -> list[Delivery] | None:
        found = await deliveries(gateway, state=state, target=target)
        return found if len(found) >= count else None

    where = "" if target is None else f" to {target}"
    return await eventually(probe, f"{count} {state} deliveries{where}")


async def stored_bodies(gateway: Gateway) -> list[bytes]:
    """Every notification body committed to the gateway's SQLite outbox, oldest first, read on
    a connection of the test's own rather than through the outbox's write queue, and without
    yielding to the event loop: what the 200 promised must already be in the file."""
    path = gateway.config.outbox.path
    assert path is not None  # these tests read the SQLite backend's file
    return bodies_in_file(path)


def bodies_in_file(path: Path) -> list[bytes]:
    """Every notification body committed to the SQLite outbox file at ``path``, oldest first,
    read on a new read-only connection."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT body FROM notifications ORDER BY id").fetchall()
    return [bytes(row[0]) for row in rows]


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str) -> T:
    """The first truthy result of ``probe``, polled until :data:`~sink.DEADLINE_S` passes."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@contextmanager
def locked_by_another_process(path: Path) -> Iterator[None]:
    """Another process holds an open ``BEGIN EXCLUSIVE`` transaction on ``path``."""
    script = (
        "import sqlite3, sys\n"
        f"conn = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
        "conn.execute('BEGIN EXCLUSIVE')\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert holder.stdin is not None
    assert holder.stdout is not None
    try:
        assert holder.stdout.readline() == b"locked\n"
        yield
    finally:
        holder.stdin.close()  # the holder reads end of file, exits, and the lock goes with it
        holder.wait(timeout=10)
        holder.stdout.close()


def damage_page(path: Path, table: str) -> None:
    """Fill the first page of ``table`` (or index) in the SQLite file at ``path`` with garbage."""
    with sqlite3.connect(path) as conn:
        (page,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)
        ).fetchone()
        (size,) = conn.execute("PRAGMA page_size").fetchone()
    conn.close()
    with path.open("r+b") as file:
        file.seek((page - 1) * size)
        file.write(b"\xa5" * size)


async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP/1.1 message (a request or an answer) from ``reader``: its head, and the body
    its Content-Length announces (none: empty)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)
