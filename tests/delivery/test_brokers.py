"""What only broker targets do: consumer groups, NATS streams and payload limits, ``check``'s
probes, missing extras, and a crash between the broker's acknowledgement and its record.

Real ``redis-server`` and ``nats-server -js`` on loopback (tests/support/brokers.py), mocking
nothing.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from brokers import BrokerServer, nats_server, pending_delivery, redis_server
from config_files import listen_port, write_config
from destinations import STREAM, NatsDestination, RedisDestination, entry_received
from helpers import (
    APP_SECRET,
    eventually,
    gateway_config,
    message_body,
    post,
    quick,
    wait_for_state,
)
from nats import connect as nats_connect
from nats.aio.msg import Msg
from pki import Pki
from processes import post_to, serving, until_listening
from redis.exceptions import ConnectionError, ResponseError
from sink import DEADLINE_S, Received
from test_forwarding import BATCH, TARGET_SECRET, envelope, gateway_signature

from gateway.cli import main
from gateway.config import TargetConfig
from gateway.config.rules import REDIS_SENDER_OPTIONS
from gateway.delivery.nats_jetstream import JetStreamSender
from gateway.delivery.redis_stream import RedisStreamSender, result_of
from gateway.delivery.sending import sender_for
from gateway.errors import TargetError, TargetUnreachable
from gateway.onboarding.check import targets_report
from gateway.outbox import Delivery
from gateway.outbox.model import AttemptResult
from gateway.runtime.gateway import Gateway


async def test_consumer_group_reads_every_change_of_a_batch_with_valid_signatures(
    pki: Pki, tmp_path: Path, redis: BrokerServer
) -> None:
    """split = "change" on a Redis target: an XREADGROUP consumer gets one entry per change of
    a batched payload, each body verifiable with the target's secret."""
    await RedisDestination(redis).flush()
    client = aioredis.Redis.from_url(redis.url)
    await client.xgroup_create("whatsapp", "bots", id="0", mkstream=True)
    target = TargetConfig(
        name="bots",
        kind="redis",
        url=redis.url,
        stream="whatsapp",
        split="change",
        secret=TARGET_SECRET,
        maxlen=1000,
    )
    try:
        async with Gateway(gateway_config(pki, tmp_path, targets=[target])) as gateway:
            assert (await post(gateway, pki, BATCH)).status == 200
            await wait_for_state(gateway, "delivered", 4)
        answer = await client.xreadgroup("bots", "worker-1", {"whatsapp": ">"}, count=100)
    finally:
        await client.aclose()
    assert isinstance(answer, list)
    [(_, entries)] = answer
    documents = []
    for _, fields in entries:
        entry = entry_received("bots", fields)
        timestamp = entry.headers["X-Gateway-Timestamp"]
        expected = gateway_signature(TARGET_SECRET, timestamp, entry.body)
        assert entry.headers["X-Gateway-Signature-256"] == expected
        documents.append(json.loads(entry.body))
    every_change = [envelope(0, 0), envelope(0, 1), envelope(1, 0), envelope(2, 0)]
    key = json.dumps
    assert sorted(map(key, documents)) == sorted(map(key, every_change))


async def test_subject_no_stream_captures_is_a_dead_letter_saying_so(
    pki: Pki, tmp_path: Path, nats: BrokerServer
) -> None:
    """Publishing where no JetStream stream listens is permanent: one attempt, a dead letter
    naming the subject; ``check`` refuses the configuration for the same reason."""
    await NatsDestination(nats).reset()
    target = TargetConfig(name="lost", **quick(kind="nats", url=nats.url, subject="elsewhere.x"))
    config = gateway_config(pki, tmp_path, targets=[target])
    async with Gateway(config) as gateway:
        assert (await post(gateway, pki, message_body("nowhere"))).status == 200
        (dead,) = await wait_for_state(gateway, "dead")
    assert dead.attempts == 1
    assert "no JetStream stream captures subject 'elsewhere.x'" in (dead.last_error or "")
    reason = re.escape("no JetStream stream captures subject 'elsewhere.x'")
    with pytest.raises(TargetError, match=reason):
        await targets_report(config)


@pytest.mark.parametrize(
    "over",
    [
        pytest.param(500_000, id="body-over"),
        # The body alone fits; with its headers the message does not, and the server would
        # close the whole connection over it.
        pytest.param(-100, id="headers-tip-it-over"),
    ],
)
async def test_message_over_max_payload_is_a_dead_letter_naming_the_limit(
    pki: Pki, tmp_path: Path, nats: BrokerServer, over: int
) -> None:
    """A message over the NATS server's max_payload (1 MB by default) is a dead letter at once,
    naming the limit and the way out, rather than endless retries; the rest still goes."""
    destination = NatsDestination(nats)
    await destination.reset()
    targets = [destination.target("big")]
    body = message_body("x" * (1_048_576 + over - len(message_body(""))))
    assert len(body) == 1_048_576 + over
    async with Gateway(gateway_config(pki, tmp_path, targets=targets)) as gateway:
        assert (await post(gateway, pki, body)).status == 200
        (dead,) = await wait_for_state(gateway, "dead")
        assert (await post(gateway, pki, message_body("small"))).status == 200
        await wait_for_state(gateway, "delivered")
    assert dead.attempts == 1
    assert "over the server's max_payload (1048576 bytes)" in (dead.last_error or "")
    assert 'split = "change"' in (dead.last_error or "")


async def test_check_reports_each_broker_reachable_or_down(
    pki: Pki, tmp_path: Path, redis: BrokerServer, nats: BrokerServer
) -> None:
    """``check`` connects to every broker target: reachable (with the NATS stream that
    captures the subject), or a warning for one that is down; HTTP targets add no line."""
    await NatsDestination(nats).reset()
    targets = [
        TargetConfig(name="queue", kind="redis", url=redis.url, stream="s"),
        TargetConfig(name="bus", kind="nats", url=nats.url, subject="waba.bus"),
        TargetConfig(name="gone", kind="redis", url="redis://127.0.0.1:9/0", stream="s"),
        TargetConfig(name="web", url="http://127.0.0.1:9/hook"),
    ]
    lines = await targets_report(gateway_config(pki, tmp_path, targets=targets))
    assert lines[0].startswith(f"ok: target 'queue': redis 127.0.0.1:{redis.port} reachable")
    assert lines[1].startswith(f"ok: target 'bus': nats 127.0.0.1:{nats.port} reachable")
    assert f"stream {STREAM!r} captures subject 'waba.bus'" in lines[1]
    assert lines[2].startswith("warning: target 'gone': redis 127.0.0.1:9")
    assert "serve starts anyway" in lines[2]
    assert len(lines) == 3


@pytest.mark.parametrize(("kind", "module"), [("redis", "redis"), ("nats", "nats")])
@pytest.mark.parametrize("command", ["check", "serve"])
def test_missing_driver_is_a_one_line_error_naming_the_extra(
    pki: Pki, tmp_path: Path, kind: str, module: str, command: str
) -> None:
    """A kind whose extra is not installed stops check and serve with one line naming it."""
    extra = {"redis": 'stream = "s"', "nats": 'subject = "waba.x"'}[kind]
    config = write_config(
        pki, tmp_path, target_url=f"{kind}://127.0.0.1:9", extra=f'kind = "{kind}"\n{extra}'
    )
    # The driver made unimportable, as when the extra was never installed.
    script = (
        f"import sys; sys.modules[{module!r}] = None; from gateway.cli import main;"
        f" sys.exit(main([{command!r}, '--config', {str(config)!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={"TEST_APP_SECRET": APP_SECRET, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"targets[0].kind = '{kind}' needs the '{kind}' extra" in result.stderr
    assert f"pip install 'waba-gateway[{kind}]'" in result.stderr


@pytest.mark.parametrize("kind", ["redis", "nats"])
async def test_sigkill_between_broker_ack_and_record_loses_nothing(
    pki: Pki, tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """The broker has the message, the gateway dies (SIGKILL) before recording it: after a
    restart it is sent again. Redis then holds it twice (at-least-once: consumers deduplicate on
    X-Gateway-Delivery-Id); NATS drops the second copy by its Nats-Msg-Id."""
    server: BrokerServer = request.getfixturevalue(kind)
    destination: RedisDestination | NatsDestination
    if kind == "redis":
        destination = RedisDestination(server)
        await destination.flush()
        extra = 'kind = "redis"\nstream = "stream:sink"'
    else:
        destination = NatsDestination(server)
        await destination.reset()
        extra = 'kind = "nats"\nsubject = "waba.sink"'
    config = write_config(pki, tmp_path, target_url=server.url, extra=extra)
    port = listen_port(config)
    body = message_body("acknowledged, then the gateway dies")
    await destination.down()
    with serving(config) as first:
        await until_listening(port, first)
        assert await post_to(port, pki, body) == 200
        # The outbox locked by another writer: whatever the gateway learns from now on, it
        # cannot record. Then the broker comes back and acknowledges the next attempt.
        lock = sqlite3.connect(tmp_path / "outbox.sqlite3", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        try:
            await destination.up()
            received = await _wait_received(destination)
            first.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait, DEADLINE_S)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
    delivery_id = received[0].headers["X-Gateway-Delivery-Id"]
    with serving(config) as second:
        await until_listening(port, second)
        outbox = sqlite3.connect(tmp_path / "outbox.sqlite3")

        async def delivered() -> bool:
            rows = outbox.execute("SELECT state FROM deliveries").fetchall()
            return rows == [("delivered",)]

        deadline = asyncio.get_running_loop().time() + DEADLINE_S
        while not await delivered():
            assert asyncio.get_running_loop().time() < deadline, "not delivered after restart"
            await asyncio.sleep(0.05)
        outbox.close()
    held = await destination.received("sink")
    assert {entry.headers["X-Gateway-Delivery-Id"] for entry in held} == {delivery_id}
    assert all(entry.body == body for entry in held)
    if kind == "redis":
        assert len(held) >= 2  # written again after the restart: at-least-once
    else:
        assert len(held) == 1  # the stream dropped the copy with the same Nats-Msg-Id


async def _wait_received(destination: RedisDestination | NatsDestination) -> list[Received]:
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while not (found := await destination.received("sink")):
        assert asyncio.get_running_loop().time() < deadline, "the broker got nothing"
        await asyncio.sleep(0.02)
    return found


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        pytest.param(
            b"1-0",
            AttemptResult(accepted=True, response_excerpt="stream s"),
            id="entry-id",
        ),
        pytest.param(
            ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
            AttemptResult(
                error="redis: WRONGTYPE Operation against a key holding the wrong kind of value",
                permanent=True,
            ),
            id="not-a-stream",
        ),
        pytest.param(
            ResponseError("OOM command not allowed when used memory > 'maxmemory'."),
            AttemptResult(error="redis: OOM command not allowed when used memory > 'maxmemory'."),
            id="out-of-memory-is-transient",
        ),
        pytest.param(
            ResponseError(
                "ERR unknown command 'XADD', with args beginning with: 'stream' 'body'"
                ' \'{"object":"whatsapp_business_account","entry":[{"changes":[{"value":'
                '{"contacts":[{"wa_id":"16315551234"}\''
            ),
            AttemptResult(error="redis: ERR unknown command 'XADD'"),
            id="renamed-command-keeps-no-argument",
        ),
        pytest.param(
            ResponseError(
                "ERR unknown command `XADD`, with arguments beginning with: `stream`, `body`,"
                ' `{"object":"whatsapp_business_account","entry":[{"changes":[{"value":'
                '{"contacts":[{"wa_id":"16315551234"}],"messages":[{"text":{"body":'
                '"Hello, I need help with my order"}}]}}]}]}`'
            ),
            AttemptResult(error="redis: (not kept: it repeats the notification)"),
            id="another-server-quoting-the-body-in-its-own-words",
        ),
        pytest.param(
            ResponseError("ERR unknown stream 447700900123"),
            AttemptResult(error="redis: ERR unknown stream ***"),
            id="a-phone-number-in-a-short-error-is-masked",
        ),
        pytest.param(
            ConnectionError("Connection reset by peer"),
            AttemptResult(error="redis: ConnectionError: Connection reset by peer"),
            id="connection-lost",
        ),
    ],
)
def test_each_xadd_reply_is_one_attempt_result(reply: object, expected: AttemptResult) -> None:
    """An entry id is accepted; WRONGTYPE will never change; anything else may. An error is
    kept as a target's own words are: nothing of the notification it was sent (_XADD_BODY)."""
    assert result_of(reply, "s", _XADD_BODY) == expected


# The notification the replies above answer: the one the quoting replies quote.
_XADD_BODY = (
    b'{"object":"whatsapp_business_account","entry":[{"changes":[{"value":{"contacts":'
    b'[{"wa_id":"16315551234"}],"messages":[{"from":"16315551234","text":{"body":'
    b'"Hello, I need help with my order"},"type":"text"}]},"field":"messages"}]}]}'
)


async def test_maxlen_trims_the_stream_approximately(redis: BrokerServer) -> None:
    """maxlen = N adds with MAXLEN ~ N: the stream stays near N entries, not all of them."""
    await RedisDestination(redis).flush()
    target = TargetConfig(name="t", kind="redis", url=redis.url, stream="capped", maxlen=10)
    sender = RedisStreamSender(target)
    try:
        for start in range(0, 600, 200):
            batch = [pending_delivery(n) for n in range(start, start + 200)]
            results = await sender.send_many(batch, [1] * len(batch))
            assert all(result.accepted for result in results)
    finally:
        await sender.close()
    client = aioredis.Redis.from_url(redis.url)
    try:
        length = await client.xlen("capped")
    finally:
        await client.aclose()
    assert 10 <= length < 300


@pytest.mark.parametrize("kind", ["redis", "nats"])
async def test_broker_password_from_the_url_reaches_the_broker(kind: str) -> None:
    """A broker that requires a password takes the one in the URL (from ${ENV} in a file);
    a wrong one is a warning at check, with no password in it, and a failed attempt to retry."""
    password = "broker-pass-1"
    if kind == "redis":
        server_of = redis_server("--requirepass", password)
    else:
        server_of = nats_server("--user", "gw", "--pass", password)
    with server_of as server:

        def target(given: str) -> TargetConfig:
            if kind == "redis":
                url = f"redis://:{given}@127.0.0.1:{server.port}/0"
                return TargetConfig(name="t", kind="redis", url=url, stream="s", timeout_s=2)
            url = f"nats://gw:{given}@127.0.0.1:{server.port}"
            return TargetConfig(name="t", kind="nats", url=url, subject="cred.x", timeout_s=2)

        if kind == "nats":
            client = await nats_connect(f"nats://gw:{password}@127.0.0.1:{server.port}")
            await client.jetstream().add_stream(name="CRED", subjects=["cred.>"])
            await client.close()
        good, bad = sender_for(target(password)), sender_for(target("wrong"))
        try:
            assert (await good.probe() or "").startswith("target 't'")
            (result,) = await good.send_many([pending_delivery(1)], [1])
            assert result.accepted
            with pytest.raises(TargetUnreachable) as info:
                await bad.probe()
            assert "wrong" not in str(info.value)
            (result,) = await bad.send_many([pending_delivery(2)], [1])
            assert not result.accepted
            assert not result.permanent
        finally:
            await good.close()
            await bad.close()


async def test_check_command_reports_brokers_and_refuses_a_subject_without_stream(
    pki: Pki,
    tmp_path: Path,
    nats: BrokerServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`waba-gateway check` prints a broker target reachable with its stream, and stops with
    one error line, before serving, when no stream captures a target's subject."""
    await NatsDestination(nats).reset()
    monkeypatch.setenv("TEST_APP_SECRET", APP_SECRET)
    extra = 'kind = "nats"\nsubject = "waba.checked"'
    config = write_config(pki, tmp_path, target_url=nats.url, extra=extra)
    assert await asyncio.to_thread(main, ["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"ok: target 'sink': nats 127.0.0.1:{nats.port} reachable, stream 'WABA'" in out
    config.write_text(config.read_text().replace("waba.checked", "elsewhere.checked"))
    assert await asyncio.to_thread(main, ["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: target 'sink': nats")
    assert "no JetStream stream captures subject 'elsewhere.checked'" in err
    assert len(err.strip().splitlines()) == 1


async def test_a_redis_that_does_not_know_xadd_keeps_the_notification_out_of_the_error(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis whose XADD is renamed away answers "unknown command" and quotes the command's
    first arguments, the notification's bytes among them: the attempt's error, kept in the
    outbox and logged, names the command and nothing of the message or its sender."""
    with redis_server("--rename-command", "XADD", "") as server:
        destination = RedisDestination(server)
        targets = [destination.target("renamed")]
        async with Gateway(gateway_config(pki, tmp_path, targets=targets)) as gateway:
            assert (await post(gateway, pki, message_body("a private remark"))).status == 200

            async def tried() -> list[Delivery] | None:
                found = await gateway.outbox.query(target="renamed")
                return [d for d in found if d.attempts] or None

            (delivery,) = await eventually(tried, "an attempt at the renamed Redis")
    assert delivery.state == "pending"  # a configuration that may change: tried again
    assert delivery.last_error == "redis: ERR unknown command 'XADD'"
    logged = caplog.text
    assert "private remark" not in logged
    assert "15550783881" not in logged  # the business number, within the quoted bytes
    assert "with args beginning" not in logged


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(
            lambda data: json.dumps(
                {
                    "error": {
                        "code": 400,
                        "description": "unknown command: "
                        + json.loads(data)["entry"][0]["changes"][0]["value"]["messages"][0][
                            "text"
                        ]["body"],
                    }
                }
            ).encode(),
            id="error-quoting-the-text",
        ),
        pytest.param(
            lambda data: json.dumps({"error": "refused: " + data.decode()}).encode(),
            id="error-quoting-the-body",
        ),
        pytest.param(
            lambda data: json.dumps({"ok": False, "from": "16505551234"}).encode(),
            id="reply-naming-the-sender",
        ),
    ],
)
async def test_a_nats_responder_quoting_the_message_keeps_it_out_of_the_error(
    pki: Pki,
    tmp_path: Path,
    nats: BrokerServer,
    caplog: pytest.LogCaptureFixture,
    answer: Callable[[bytes], bytes],
) -> None:
    """A service subscribed to the subject (no stream captures it) answers the publish
    itself, quoting what it was sent, as an HTTP target may echo a notification in its error
    page: the attempt's error, kept in the outbox, shown and logged, names none of the
    message's text or its sender's number."""
    responder = await nats_connect(nats.url)

    async def reply(message: Msg) -> None:
        await message.respond(answer(message.data))

    try:
        await responder.subscribe("answers.quoted", cb=reply)
        await responder.flush()
        target = TargetConfig(
            name="quoted", **quick(kind="nats", url=nats.url, subject="answers.quoted")
        )
        async with Gateway(gateway_config(pki, tmp_path, targets=[target])) as gateway:
            assert (await post(gateway, pki, message_body("a private remark"))).status == 200

            async def tried() -> list[Delivery] | None:
                found = await gateway.outbox.query(target="quoted")
                return [d for d in found if d.attempts] or None

            (delivery,) = await eventually(tried, "an attempt at the quoting responder")
            history = await gateway.outbox.attempts(delivery.id)
    finally:
        await responder.close()
    assert delivery.state == "pending"
    assert (delivery.last_error or "").startswith("nats: ")
    kept = [delivery.last_error or "", *(a.error or "" for a in history), caplog.text]
    for text in kept:
        assert "private remark" not in text
        assert "16505551234" not in text


async def test_stream_key_holding_another_type_is_a_dead_letter_at_once(
    pki: Pki, tmp_path: Path, redis: BrokerServer
) -> None:
    """XADD to a key that is not a stream gets WRONGTYPE: a dead letter after one attempt, and
    the connection goes on serving the next exchange."""
    await RedisDestination(redis).flush()
    client = aioredis.Redis.from_url(redis.url)
    await client.set("stream:taken", "a string")
    await client.aclose()
    destination = RedisDestination(redis)
    targets = [destination.target("taken"), destination.target("fine")]
    async with Gateway(gateway_config(pki, tmp_path, targets=targets)) as gateway:
        for text in ("one", "two"):
            assert (await post(gateway, pki, message_body(text))).status == 200
        dead = await wait_for_state(gateway, "dead", 2, target="taken")
        await wait_for_state(gateway, "delivered", 2, target="fine")
    assert all(d.attempts == 1 for d in dead)
    assert all("WRONGTYPE" in (d.last_error or "") for d in dead)
    assert len(await destination.received("fine")) == 2


@pytest.mark.parametrize(
    ("options", "credentials"),
    [
        pytest.param(("--user", "gw", "--pass", "broker-pass-1"), "gw:broker-pass-1", id="user"),
        pytest.param(("--user", "gw", "--pass", "pa55,w0rd"), "gw:pa55,w0rd", id="comma"),
        pytest.param(("--auth", "T0ken-1"), "T0ken-1", id="token"),
    ],
)
async def test_nats_credentials_written_once_reach_the_server_failed_over_to(
    options: tuple[str, ...], credentials: str
) -> None:
    """README's form of a NATS target: the credentials on the first server of the list, the
    second written without. With the first down, the gateway connects to the second with the
    same credentials (a user and password, one holding a comma, or a token) and delivers."""
    with nats_server(*options) as one, nats_server(*options) as two:
        for server in (one, two):
            client = await nats_connect(f"nats://{credentials}@127.0.0.1:{server.port}")
            await client.jetstream().add_stream(name="CRED", subjects=["cred.>"])
            await client.close()
        url = f"nats://{credentials}@127.0.0.1:{one.port},nats://127.0.0.1:{two.port}"
        target = TargetConfig(name="t", kind="nats", url=url, subject="cred.x", timeout_s=2)
        sender = JetStreamSender(target)
        try:
            one.down()
            results: list[AttemptResult] = []
            for attempt in (1, 2, 3):  # the first may go to the server that is down
                results += await sender.send_many([pending_delivery(1)], [attempt])
                if results[-1].accepted:
                    break
            assert results[-1].accepted, [r.error for r in results]
            client = await nats_connect(f"nats://{credentials}@127.0.0.1:{two.port}")
            try:
                assert (await client.jetstream().stream_info("CRED")).state.messages == 1
            finally:
                await client.close()
        finally:
            await sender.close()


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        pytest.param("?ssl_cert_reqs=required", "ssl_cert_reqs", id="tls-option-on-redis"),
        pytest.param("?sockettimeout=5", "sockettimeout", id="misspelt"),
        pytest.param("?socket_timeout=abc", "socket_timeout", id="not-a-number"),
    ],
)
async def test_redis_url_options_redis_py_refuses_fail_each_delivery_for_good(
    redis: BrokerServer, query: str, reason: str
) -> None:
    """A target built without load_config (which refuses them) whose URL has an option
    redis-py's connection refuses: the sender does not raise; each delivery is a dead letter
    naming the option, ``probe`` a TargetError (``check``'s one line), ``warm`` quiet."""
    url = f"redis://:hidden-pw@127.0.0.1:{redis.port}/0{query}"
    sender = RedisStreamSender(TargetConfig(name="t", kind="redis", url=url, stream="s"))
    try:
        await sender.warm()
        for _ in range(2):  # and again: nothing was left half made
            results = await sender.send_many([pending_delivery(1), pending_delivery(2)], [1, 1])
            assert all(r.permanent and not r.accepted for r in results), results
            assert all(reason in (r.error or "") for r in results), results
        with pytest.raises(TargetError, match=reason) as info:
            await sender.probe()
        assert type(info.value) is TargetError  # not "unreachable": retrying cannot help
        assert "hidden-pw" not in str(info.value)
        assert not any("hidden-pw" in (r.error or "") for r in results)
    finally:
        await sender.close()


@pytest.mark.parametrize(
    ("query", "name"),
    [
        pytest.param("?decode_responses=true", "decode_responses", id="decode-responses"),
        pytest.param("?protocol=3", "protocol", id="protocol"),
        pytest.param("?socket_timeout=5", "socket_timeout", id="socket-timeout"),
        pytest.param("?socket_connect_timeout=2", "socket_connect_timeout", id="connect-timeout"),
    ],
)
async def test_a_redis_url_option_the_sender_sets_itself_fails_each_delivery_for_good(
    redis: BrokerServer, query: str, name: str
) -> None:
    """A target built without load_config (which refuses it) whose URL overrides an option the
    sender sets (replies as bytes, RESP2, its timeouts): each delivery is a dead letter and
    ``probe`` a TargetError, both naming the option, rather than a probe that calls a valid
    stream "a stream, not a stream" or deliveries read on a protocol the sender does not speak."""
    client = aioredis.Redis.from_url(redis.url)
    await client.xadd("owned", {"body": b"{}"})  # a valid target: its key holds a stream
    await client.aclose()
    url = f"redis://:hidden-pw@127.0.0.1:{redis.port}/0{query}"
    sender = RedisStreamSender(TargetConfig(name="t", kind="redis", url=url, stream="owned"))
    reason = f"{name!r} is set by the gateway itself: {REDIS_SENDER_OPTIONS[name]}"
    try:
        await sender.warm()
        results = await sender.send_many([pending_delivery(1), pending_delivery(2)], [1, 1])
        assert results == [AttemptResult(error=f"redis: {reason}", permanent=True)] * 2
        with pytest.raises(TargetError) as info:
            await sender.probe()
        assert type(info.value) is TargetError  # not "unreachable": retrying cannot help
        assert str(info.value) == f"target 't': redis 127.0.0.1:{redis.port}: {reason}"
    finally:
        await sender.close()


async def test_the_sender_sets_each_option_a_redis_url_may_not(redis: BrokerServer) -> None:
    """What the configuration refuses in a URL is what the sender passes redis-py itself, with
    the values a URL would replace: replies as bytes, RESP2, no socket timeout, and the
    target's timeout to connect."""
    url, stream = redis.url, "sender-options"  # a key nothing else writes
    sender = RedisStreamSender(
        TargetConfig(name="t", kind="redis", url=url, stream=stream, timeout_s=7)
    )
    try:
        given = sender._client.connection_pool.connection_kwargs
        assert {name: given[name] for name in REDIS_SENDER_OPTIONS} == {
            "decode_responses": False,
            "protocol": 2,
            "socket_connect_timeout": 7,
            "socket_timeout": None,
        }
        assert (await sender.probe()).endswith(f"stream {stream!r} has 0 entries")
    finally:
        await sender.close()


@pytest.mark.parametrize(
    "query", ["?ssl_cert_reqs=required", "?sockettimeout=5", "?socket_timeout=abc"]
)
async def test_check_refuses_a_redis_url_option_redis_py_refuses_in_one_line(
    pki: Pki,
    tmp_path: Path,
    redis: BrokerServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    query: str,
) -> None:
    """`check` (as `serve`) stops at the configuration, one line naming the key, instead of a
    traceback from the driver."""
    monkeypatch.setenv("TEST_APP_SECRET", APP_SECRET)
    extra = 'kind = "redis"\nstream = "whatsapp"'
    config = write_config(pki, tmp_path, target_url=f"{redis.url}/0{query}", extra=extra)
    assert await asyncio.to_thread(main, ["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {config}: targets[0].url = 'redis://127.0.0.1:{redis.port}/0")
    assert "expected a redis:// or rediss:// URL whose options redis-py takes" in err


async def test_a_nats_connection_that_falls_silent_is_let_go_for_another_server() -> None:
    """Two NATS servers; the one the sender is connected to freezes (SIGSTOP: the connection
    stays open, nothing is answered, as behind a partition). The batch sent then times out, and
    the next one connects again, to the other server, and is stored there, instead of waiting
    out its timeout on the silent connection until nats-py's pings notice, minutes later."""
    with nats_server() as one, nats_server() as two:
        for server in (one, two):
            client = await nats_connect(server.url)
            await client.jetstream().add_stream(name="SILENT", subjects=["silent.>"])
            await client.close()

        async def stored(server: BrokerServer) -> int:
            client = await nats_connect(server.url)
            try:
                return int((await client.jetstream().stream_info("SILENT")).state.messages)
            finally:
                await client.close()

        url = f"{one.url},{two.url}"
        target = TargetConfig(name="t", kind="nats", url=url, subject="silent.x", timeout_s=4)
        sender = JetStreamSender(target)
        try:
            (first,) = await sender.send_many([pending_delivery(1)], [1])
            assert first.accepted, first.error
            connected, other = (one, two) if await stored(one) == 1 else (two, one)
            with connected.frozen():
                (silent,) = await sender.send_many([pending_delivery(2)], [1])
                assert not silent.accepted
                assert "no acknowledgement" in (silent.error or "")
                (after,) = await sender.send_many([pending_delivery(3)], [1])
                assert after.accepted, after.error
                assert await stored(other) == 1
        finally:
            await sender.close()
