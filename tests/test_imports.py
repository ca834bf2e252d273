"""What importing a part of the gateway loads: the light parts stay light.

Each check runs in a fresh interpreter, since this test process has loaded everything already.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

STORAGE = ("sqlite3", "asyncpg", "gateway.outbox.sqlite", "gateway.outbox.postgres")
SERVER = (
    "gateway.runtime.gateway",
    "gateway.admin.api",
    "gateway.admin.console",
    "gateway.edge.listener",
    "gateway.delivery.dispatcher",
)


def _loaded(module: str, prefixes: tuple[str, ...]) -> list[str]:
    """The modules starting with one of ``prefixes`` that importing ``module`` loads."""
    code = (
        f"import sys, {module}\n"
        f"print('\\n'.join(sorted(m for m in sys.modules if m.startswith({prefixes!r}))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout.split()


@pytest.mark.parametrize(
    "module", ["gateway.outbox", "gateway.outbox.model", "gateway.edge.routing"]
)
def test_the_outbox_values_and_routing_load_no_storage_engine(module: str) -> None:
    """Naming the outbox's values (Route, Delivery, states) loads neither SQLite nor PostgreSQL."""
    assert _loaded(module, STORAGE) == []


@pytest.mark.parametrize(
    "module",
    [
        "gateway.cli.args",
        "gateway.cli.check",
        "gateway.cli.doctor",
        "gateway.cli.deliveries",
        "gateway.cli.reload",
    ],
)
def test_commands_that_only_read_a_configuration_load_no_server(module: str) -> None:
    """check, doctor, deliveries and reload (and --dev's file lookup) load no listener,
    dispatcher, admin API or console."""
    assert _loaded(module, SERVER) == []
