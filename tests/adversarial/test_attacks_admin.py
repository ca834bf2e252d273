"""Attacks on the admin listener: no token, a wrong token, injected queries, unknown ids."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import admin_get, admin_post
from pki import Pki
from sink import Sink

from adversarial.attack import attack_gateway, still_serves

TOKEN = "admin-token-for-attacks"


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        pytest.param("GET", "/admin/deliveries", {}, 401, id="list without a token"),
        pytest.param(
            "GET", "/admin/deliveries", {"Authorization": "Bearer wrong"}, 401, id="a wrong token"
        ),
        pytest.param(
            "GET",
            "/admin/deliveries",
            {"Authorization": f"Bearer {TOKEN}x"},
            401,
            id="the token with a byte more",
        ),
        pytest.param("GET", "/metrics", {"Authorization": f"bearer {TOKEN}"}, 401, id="lowercase"),
        pytest.param("POST", "/admin/deliveries/x-1/replay", {}, 401, id="replay without token"),
        pytest.param(
            "GET",
            "/admin/deliveries?state=dead'--",
            {"Authorization": f"Bearer {TOKEN}"},
            400,
            id="a state that is SQL",
        ),
        pytest.param(
            "GET",
            "/admin/deliveries?limit=99999999999",
            {"Authorization": f"Bearer {TOKEN}"},
            400,
            id="a huge limit",
        ),
        pytest.param(
            "POST",
            "/admin/deliveries/..%2F..%2Fetc%2Fpasswd/replay",
            {"Authorization": f"Bearer {TOKEN}"},
            404,
            id="a path in place of an id",
        ),
    ],
)
async def test_admin_requests_without_the_token_or_with_bad_input_are_refused(
    pki: Pki,
    tmp_path: Path,
    sink: Sink,
    method: str,
    path: str,
    headers: dict[str, str],
    status: int,
) -> None:
    """Each is refused with its status; the callback keeps serving and nothing is forwarded."""
    async with attack_gateway(pki, tmp_path, sink, admin_token=TOKEN) as gateway:
        call = admin_get if method == "GET" else admin_post
        assert (await call(gateway, path, headers=headers)).status == status
        await still_serves(gateway, pki, sink)


async def test_probes_stay_open_but_show_nothing_private(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """Liveness and readiness need no token (orchestrators call them) and say only ok/ready."""
    async with attack_gateway(pki, tmp_path, sink, admin_token=TOKEN) as gateway:
        assert (await admin_get(gateway, "/healthz")).text == "ok\n"
        assert (await admin_get(gateway, "/readyz")).text == "ready\n"
        await still_serves(gateway, pki, sink)
