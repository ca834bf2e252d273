"""The exit codes of ``waba-gateway``, written once.

Rule: every command exits 0 on success and 2 on a usage or input error (a
:class:`~gateway.errors.GatewayError` caught by :func:`gateway.cli.main`). The commands that talk
to the Graph API tell failures apart further (:data:`GRAPH_EXIT_CODES`); the commands that judge a
deployment (``doctor``, ``send``, ``verify-callback``) exit 1 when the judgment is "not ready".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from gateway.errors import GraphFailure

__all__ = [
    "EXIT_AUTH",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_RATE_LIMITED",
    "EXIT_USAGE",
    "GRAPH_EPILOG",
    "GRAPH_EXIT_CODES",
]

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_AUTH: Final = 3
EXIT_RATE_LIMITED: Final = 4

GRAPH_EXIT_CODES: Final[Mapping[GraphFailure, int]] = {
    "failure": EXIT_FAILURE,
    "usage": EXIT_USAGE,
    "auth": EXIT_AUTH,
    "rate_limited": EXIT_RATE_LIMITED,
}

# The Graph commands' table, as `--help` prints it (and as the README shows it).
GRAPH_EPILOG: Final = f"""\
exit codes:
  {EXIT_OK}  success
  {EXIT_FAILURE}  other failure: Graph error, non-JSON answer, connection failure, timeout
  {EXIT_USAGE}  usage or input error: bad WABA id, missing access token, bad option value
  {EXIT_AUTH}  access token rejected or permission denied (HTTP 401/403, Graph codes 190, 102, 10, \
200-299)
  {EXIT_RATE_LIMITED}  rate limited (Graph codes 4, 17, 32, 613, 80007, 80008 or HTTP 429): wait \
the minutes shown
"""
