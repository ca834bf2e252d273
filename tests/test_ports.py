"""The ports' helpers: a bound port read through aiohttp's public runner API
(gateway.runtime.ports)."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from gateway.runtime.ports import bound_port


async def _here(_: web.Request) -> web.Response:
    return web.Response(text="here")


async def test_bound_port_is_the_port_a_client_reaches_after_binding_port_0() -> None:
    """``bound_port`` names the port the runner's site took when asked for any free one."""
    app = web.Application()
    app.router.add_get("/", _here)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = bound_port(runner)
        assert port != 0
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/") as response,
        ):
            assert await response.text() == "here"
    finally:
        await runner.cleanup()
