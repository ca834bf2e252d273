"""The listening socket (gateway.edge.acceptor.bind): which clients each listen.host takes."""

from __future__ import annotations

import socket

import pytest

from gateway.edge.acceptor import bind


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def _reaches(address: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(2)
        try:
            client.connect((address, port))
        except OSError:
            return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize(
    ("host", "clients"),
    [
        pytest.param("::", {"127.0.0.1": True, "::1": True}, id="every-interface-both-families"),
        pytest.param("0.0.0.0", {"127.0.0.1": True, "::1": False}, id="every-ipv4-interface"),
        pytest.param("::1", {"::1": True, "127.0.0.1": False}, id="one-ipv6-address"),
    ],
)
def test_each_listen_host_takes_the_clients_it_names(host: str, clients: dict[str, bool]) -> None:
    """listen.host = "::" takes IPv4 clients too (as IPv4-mapped addresses): with one
    listen.host, an IPv6-only "::" would leave no way to serve Meta over both families."""
    with bind(host, 0) as sock:
        port = sock.getsockname()[1]
        assert {address: _reaches(address, port) for address in clients} == clients
