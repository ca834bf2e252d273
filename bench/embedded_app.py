"""Serve the callback as an embedded aiohttp application, for measuring that front door.

``candidate.sh`` runs this instead of ``waba-gateway serve`` when WABA_BENCH_FRONT_DOOR=embedded:
the same configuration, served by ``web.run_app(create_app(config), ssl_context=...)`` as the
README's "Inside an aiohttp application" shows, so the benchmark compares the two front doors
on one core with everything else equal.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from aiohttp import web

from gateway import create_app
from gateway.config import load_config
from gateway.edge.tls import build_server_context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    config = load_config(parser.parse_args().config)
    logging.basicConfig(level=config.log_level.upper())
    web.run_app(
        create_app(config),
        host=config.listen.host,
        port=config.listen.port,
        ssl_context=build_server_context(config.tls),
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
