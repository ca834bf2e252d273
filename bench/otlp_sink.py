"""A loopback OTLP/HTTP collector for benchmarks: takes every POST to /v1/traces, counts the
spans (decoded with opentelemetry-proto, as a collector would) and answers at once.

Usage: python bench/otlp_sink.py [--port 4318]   (prints the span count at exit)
"""

from __future__ import annotations

import argparse

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

_ANSWER = ExportTraceServiceResponse().SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    spans = 0

    async def export(request: web.Request) -> web.Response:
        nonlocal spans
        decoded = ExportTraceServiceRequest.FromString(await request.read())
        for resource in decoded.resource_spans:
            spans += sum(len(scope.spans) for scope in resource.scope_spans)
        return web.Response(body=_ANSWER, content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", export)
    try:
        web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)
    finally:
        print(f"spans received: {spans}", flush=True)


if __name__ == "__main__":
    main()
