"""The ordering benchmark's steady drain rate ends at the last distinct delivery, so resent
deliveries (at-least-once) never end its span early (bench/ordering.py, bench/idsink.py)."""

from __future__ import annotations

import asyncio
import http.client
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest
from loopback_ports import free_port
from processes import kill_group, until_listening
from repo_scripts import ROOT, load_script


@pytest.fixture
def ordering(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/ordering.py, with bench/bench.py and bench/counts.py as the ``bench`` and
    ``counts`` it imports (as when run)."""
    monkeypatch.setitem(sys.modules, "bench", load_script("bench/bench.py", "bench"))
    monkeypatch.setitem(sys.modules, "counts", load_script("bench/counts.py", "counts"))
    return load_script("bench/ordering.py", "bench_ordering")


@pytest.fixture
def id_sink() -> Iterator[int]:
    """bench/idsink.py serving on a loopback port: the port."""
    port = free_port()
    argv = [sys.executable, str(ROOT / "bench" / "idsink.py"), "--port", str(port)]
    process = subprocess.Popen(argv, start_new_session=True)
    try:
        asyncio.run(until_listening(port, process))
        yield port
    finally:
        kill_group(process)


def _deliver(port: int, delivery_id: str | None) -> None:
    """One delivery as the gateway sends it (``None``: a GET of the sink's figures)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        if delivery_id is None:
            conn.request("GET", "/__stats")
        else:
            conn.request("POST", "/sink", b"{}", {"X-Gateway-Delivery-Id": delivery_id})
        conn.getresponse().read()
    finally:
        conn.close()


def test_watch_sink_waits_for_distinct_deliveries_not_requests(
    ordering: ModuleType, id_sink: int
) -> None:
    """Three requests for one delivery are not three deliveries: the watch runs out of time;
    once two more deliveries come, it ends."""
    for _ in range(3):
        _deliver(id_sink, "d-1")
    _, last = ordering.watch_sink(id_sink, 3, 0.3)
    assert last is None
    for delivery_id in ("d-2", "d-3"):
        _deliver(id_sink, delivery_id)
    first, last = ordering.watch_sink(id_sink, 3, 10.0)
    assert last is not None
    assert first <= last
