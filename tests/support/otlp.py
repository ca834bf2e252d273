"""A real OTLP/HTTP trace receiver on loopback, decoding what it gets with OpenTelemetry's own
protobuf definitions (opentelemetry-proto), as a collector would."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

# Span.kind in the OTLP definitions.
SERVER, CLIENT, INTERNAL = 2, 3, 1


@dataclass(frozen=True, slots=True)
class ExportedSpan:
    """One span as the receiver decoded it; ids in hex, "" for no parent."""

    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    links: list[str]  # the trace ids of its links
    service: str
    status: int = 0  # Status.code: 0 unset, 1 ok, 2 error


def value_of(value: AnyValue) -> Any:
    """An AnyValue's value, whichever kind it holds."""
    which = value.WhichOneof("value")
    return None if which is None else getattr(value, which)


class Receiver:
    """``async with Receiver() as receiver``: POST /v1/traces on 127.0.0.1 until the block
    ends; ``raw`` keeps every request body (decompressed), ``headers`` its headers (names in
    lower case), ``connections`` counts connections; with ``tls``, over HTTPS."""

    def __init__(self, refuse: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self._refuse = refuse  # answer this many first exports 400, as a collector refusing them
        self._tls = tls
        self.spans: list[ExportedSpan] = []
        self.raw: list[bytes] = []
        self.headers: list[dict[str, str]] = []  # each request's
        self.connections = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_post("/v1/traces", self._export)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._tls)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        server = self._runner.server
        assert server is not None
        made = server.connection_made

        def counted(handler: Any, transport: Any) -> None:
            self.connections += 1
            made(handler, transport)

        server.connection_made = counted  # type: ignore[method-assign]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _export(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()  # aiohttp undoes a Content-Encoding
        if self._refuse:
            self._refuse -= 1
            return web.Response(status=400, text="refused")
        self.raw.append(body)
        self.headers.append({name.lower(): value for name, value in request.headers.items()})
        decoded = ExportTraceServiceRequest.FromString(body)
        for resource_spans in decoded.resource_spans:
            resource = {a.key: value_of(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ExportedSpan(
                            name=span.name,
                            kind=span.kind,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            attributes={a.key: value_of(a.value) for a in span.attributes},
                            links=[link.trace_id.hex() for link in span.links],
                            service=str(resource.get("service.name")),
                            status=span.status.code,
                        )
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def of_kind(self, kind: int) -> list[ExportedSpan]:
        return [span for span in self.spans if span.kind == kind]
