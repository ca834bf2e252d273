"""OpenTelemetry traces of the gateway: the spans (:mod:`gateway.tracing.spans`, API only) and
the SDK's exporter (:mod:`gateway.tracing.export`, the ``otel`` extra, imported only when
tracing is enabled)."""

from gateway.tracing.spans import Tracing

__all__ = ["Tracing"]
