"""Starting the OpenTelemetry SDK for one gateway process: a tracer provider of its own and an
OTLP/HTTP exporter, both from the ``otel`` extra.

Rule: imported only when ``[tracing] enabled = true`` (the configuration refuses that without
the extra), so a gateway without tracing imports no SDK, starts no exporter thread and opens no
connection. The provider is the gateway's own, never the global one: a program that embeds the
callback keeps its own tracing set-up.
"""

from __future__ import annotations

import asyncio

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from gateway.config import TracingConfig
from gateway.tracing.spans import Tracing
from gateway.version import __version__

__all__ = ["Exporting"]


class Exporting:
    """The SDK's provider and exporter for ``config``; :attr:`tracing` makes the spans."""

    def __init__(self, config: TracingConfig) -> None:
        # An endpoint in the file is the collector's base URL, as OTEL_EXPORTER_OTLP_ENDPOINT
        # is; without one the exporter reads the OTEL_EXPORTER_OTLP_* variables itself.
        endpoint = None if config.endpoint is None else config.endpoint.rstrip("/") + "/v1/traces"
        self._provider = TracerProvider(
            resource=Resource.create(
                {"service.name": config.service_name, "service.version": __version__}
            ),
            # A delivery attempt follows the decision its notification's trace was given.
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        )
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self.tracing = Tracing(self._provider.get_tracer("waba-gateway", __version__))

    async def close(self) -> None:
        """Export what is still buffered, then stop the exporter (off the event loop: it
        blocks on the collector)."""
        await asyncio.to_thread(self._provider.shutdown)
