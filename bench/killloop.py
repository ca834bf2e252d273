"""Kill loop: SIGKILL the gateway under load, round after round, then count what was lost.

Each round starts ``waba-gateway serve`` (as a process group: the supervisor and its workers),
waits until it answers, sends unique, signed notifications over mTLS from several concurrent
clients as Meta would, and SIGKILLs the whole group at a random moment while requests are in
flight. After the last round the gateway is started once more and left to deliver everything to the
target.

With ``--outbox postgres`` a throw-away PostgreSQL server (tests/support/pgserver.py) holds one outbox
that ``--gateways`` gateways share, each on its own port. The clients spread over them and move
to another when theirs stops answering (as a load balancer would); each round SIGKILLs one of
them, chosen at random, while the others go on under load, and the next round starts it again.
A killed gateway's claims pass to the others once its lease (``--lease-s``) has run out.

Then it prints:

- acknowledged: distinct notifications that got a 200 before the kill;
- delivered: distinct acknowledged notifications the target received;
- lost: acknowledged but never delivered (must be 0: a 200 promises durability);
- duplicated: extra receipts of a notification already received (at-least-once delivery: an
  attempt in flight when the gateway died is sent again; targets deduplicate on
  ``X-Gateway-Delivery-Id``).

Everything runs on 127.0.0.1 with throw-away certificates, bounded by ``--rounds`` and
``--max-s``. Exit 0 when nothing was lost, 1 otherwise.

    python bench/killloop.py --rounds 10 --workers 1
    python bench/killloop.py --rounds 10 --workers 2 --outbox postgres --gateways 2
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import hmac
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import trustme
from aiohttp import web

META_CN = "client.webhooks.fbclientcerts.com"
SECRET = "kill-loop-app-secret"
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def body_for(marker: str) -> bytes:
    payload = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "102290129340398", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": "106540352"},
            "messages": [{"from": "16505551234", "id": f"wamid.{marker}", "timestamp": "1749416383",
                          "type": "text", "text": {"body": "kill loop"}}]}}]}],
    }
    return json.dumps(payload, separators=(",", ":")).encode()


class Target:
    """The internal service: counts each notification it receives, by its marker."""

    def __init__(self) -> None:
        self.received: collections.Counter[str] = collections.Counter()
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def receive(request: web.Request) -> web.Response:
            payload = json.loads(await request.read())
            marker = payload["entry"][0]["changes"][0]["value"]["messages"][0]["id"]
            self.received[marker.removeprefix("wamid.")] += 1
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/", receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def make_files(
    folder: Path, args: argparse.Namespace, target_port: int, outbox: str
) -> tuple[list[Path], ssl.SSLContext]:
    """A configuration file for each gateway (its own port, the one ``outbox``), and the
    clients' TLS context."""
    meta = trustme.CA()
    client = meta.create_child_ca().issue_cert(META_CN, common_name=META_CN)
    server_ca = trustme.CA()
    server = server_ca.issue_cert("127.0.0.1", "localhost")
    meta.cert_pem.write_to_path(str(folder / "meta-ca.pem"))
    server.private_key_and_cert_chain_pem.write_to_path(str(folder / "server.pem"))
    server.private_key_pem.write_to_path(str(folder / "server.key"))
    configs = []
    for number in range(args.gateways):
        config = folder / f"gateway-{number}.toml"
        config.write_text(f"""
[listen]
host = "127.0.0.1"
port = {free_port()}
workers = {args.workers}
loop = "{args.loop}"
[tls]
cert_file = "server.pem"
key_file = "server.key"
client_ca_file = "meta-ca.pem"
[meta]
verify_tokens = ["kill-loop-verify"]
app_secrets = ["{SECRET}"]
[outbox]
{outbox}
[[targets]]
name = "target"
url = "http://127.0.0.1:{target_port}/"
wait_initial_s = 0.05
wait_max_s = 0.5
[admin]
enabled = false
[dispatcher]
poll_interval_s = 0.05
[log]
level = "error"
""")
        configs.append(config)
    context = ssl.create_default_context(cafile=None)
    server_ca.configure_trust(context)
    client.configure_cert(context)
    return configs, context


def start_gateway(config: Path) -> subprocess.Popen[bytes]:
    path = str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = dict(os.environ, PYTHONPATH=path)
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def port_of(config: Path) -> int:
    for line in config.read_text().splitlines():
        if line.startswith("port = "):
            return int(line.split("=")[1])
    raise SystemExit("no port in the config")


async def wait_serving(url: str, context: ssl.SSLContext, limit_s: float = 60) -> None:
    """Until the gateway answers Meta's verification GET: with several workers the socket
    accepts (the supervisor binds it) well before a worker serves, more so on a busy machine."""
    query = "?hub.mode=subscribe&hub.verify_token=kill-loop-verify&hub.challenge=1"
    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + query) as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, OSError):
                pass
            await asyncio.sleep(0.05)
    raise SystemExit(f"the gateway at {url} did not serve within {limit_s:g} s")


async def load(urls: list[str], context: ssl.SSLContext, acked: set[str], stop: asyncio.Event,
               clients: int) -> None:
    """``clients`` keep-alive clients posting unique notifications until ``stop``, spread over
    ``urls``; a client whose gateway fails moves to the next."""

    async def client(number: int) -> None:
        connector = aiohttp.TCPConnector(ssl=context, limit=1)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            sequence = 0
            failures = 0
            while not stop.is_set():
                url = urls[(number + failures) % len(urls)]
                sequence += 1
                marker = f"{os.getpid()}x{time.monotonic_ns()}x{number}x{sequence}"
                body = body_for(marker)
                signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
                try:
                    async with session.post(url, data=body, headers={
                        "Content-Type": "application/json", "X-Hub-Signature-256": signature,
                    }) as response:
                        await response.read()
                        if response.status == 200:
                            acked.add(marker)
                except (aiohttp.ClientError, TimeoutError, OSError):
                    failures += 1
                    await asyncio.sleep(0.01)  # the gateway is down: try again shortly

    await asyncio.gather(*(client(n) for n in range(clients)))


def kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


async def main_async(args: argparse.Namespace) -> int:
    started = time.monotonic()
    target = Target()
    await target.start()
    acked: set[str] = set()
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="waba-killloop-"))
        outbox = 'path = "outbox.sqlite3"'
        if args.outbox == "postgres":
            sys.path.insert(0, str(HERE.parent / "tests" / "support"))
            from pgserver import running_server  # only for this outbox

            server = stack.enter_context(running_server())
            outbox = f'url = "{server.socket_url()}"\nlease_s = {args.lease_s}'
        configs, context = make_files(Path(tmp), args, target.port, outbox)
        ports = [port_of(config) for config in configs]
        urls = [f"https://127.0.0.1:{port}/webhook" for port in ports]
        running: dict[int, subprocess.Popen[bytes]] = {}

        async def start_stopped() -> None:
            for number, config in enumerate(configs):
                if number not in running:
                    running[number] = start_gateway(config)
                    await wait_serving(urls[number], context)

        rounds = 0
        try:
            for _ in range(args.rounds):
                if time.monotonic() - started > args.max_s:
                    break
                await start_stopped()
                stop = asyncio.Event()
                sending = asyncio.ensure_future(load(urls, context, acked, stop, args.clients))
                await asyncio.sleep(random.uniform(args.min_load_s, args.max_load_s))
                victim = random.choice(list(running))
                kill_group(running.pop(victim))  # while requests are in flight
                if running:  # the others go on under load without it for a while
                    await asyncio.sleep(random.uniform(args.min_load_s, args.max_load_s))
                stop.set()
                await sending
                rounds += 1
            # Every gateway once more: everything acknowledged must now reach the target.
            await start_stopped()
            deadline = time.monotonic() + args.drain_s
            while time.monotonic() < deadline and not acked <= set(target.received):
                await asyncio.sleep(0.1)
        finally:
            for gateway in running.values():
                gateway.send_signal(signal.SIGTERM)
            for gateway in running.values():
                gateway.wait(30)
    await target.stop()
    delivered = acked & set(target.received)
    lost = len(acked) - len(delivered)
    duplicated = sum(count - 1 for count in target.received.values() if count > 1)
    print(f"rounds: {rounds} ({args.outbox}, {args.gateways} gateway(s) of {args.workers}"
          f" worker(s) on {args.loop}, {args.clients} clients, {time.monotonic() - started:.0f} s)")
    print(f"acknowledged: {len(acked)}")
    print(f"delivered: {len(delivered)}")
    print(f"lost: {lost}")
    print(f"duplicated: {duplicated}")
    return 0 if lost == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--clients", type=int, default=16, help="concurrent keep-alive clients")
    parser.add_argument("--min-load-s", type=float, default=0.5, help="shortest load before a kill")
    parser.add_argument("--max-load-s", type=float, default=2.0, help="longest load before a kill")
    parser.add_argument("--drain-s", type=float, default=120, help="wait for delivery at the end")
    parser.add_argument("--max-s", type=float, default=600, help="stop starting rounds after this")
    parser.add_argument("--outbox", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--gateways", type=int, default=None,
                        help="gateways sharing the outbox (postgres only; default 2 there)")
    parser.add_argument("--lease-s", type=float, default=3.0,
                        help="outbox.lease_s (postgres): when a killed gateway's claims pass on")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                        help="listen.loop of every gateway")
    args = parser.parse_args(argv)
    if args.gateways is None:
        args.gateways = 2 if args.outbox == "postgres" else 1
    if args.gateways < 1 or (args.gateways > 1 and args.outbox == "sqlite"):
        parser.error("--gateways: one per SQLite file (a second is refused); several on postgres")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
