"""OpenTelemetry traces of the gateway: the spans (:mod:`gateway.tracing.spans`, OpenTelemetry
API spans that record themselves, and :mod:`~gateway.tracing.records`, the plain records of
a notification's SERVER span and commit and of a batch's attempts), what each carries
(:mod:`gateway.tracing.attributes`), W3C trace context (:mod:`gateway.tracing.context`), and
their export over OTLP/HTTP (:mod:`gateway.tracing.export`, with
:mod:`~gateway.tracing.encoding` and :mod:`~gateway.tracing.collector`: the ``otel`` extra,
imported only when tracing is enabled)."""

from gateway.tracing.attributes import server_attributes
from gateway.tracing.records import Attempts, Notified
from gateway.tracing.spans import Span, Tracing

__all__ = ["Attempts", "Notified", "Span", "Tracing", "server_attributes"]
