"""The CPU of tracing alone, per notification: the spans the listener, the outbox commit and the
dispatcher make for one notification and its delivery (SERVER, commit, one CLIENT attempt), ended
as they are, then exported to an OTLP/HTTP collector, all in this process.

Usage:
  python bench/otlp_sink.py --port 14318 &
  python bench/tracing_cost.py --count 20000 --endpoint http://127.0.0.1:14318
  # instructions, whatever the machine's load (about 50x slower; a fixed count):
  valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
      python bench/tracing_cost.py --count 2000 --endpoint http://127.0.0.1:14318
  callgrind_annotate /tmp/cg.out | head -1   # "PROGRAM TOTALS": divide by the count
  # the same without the exporter's thread, whose timing moves the count by about 10,000
  # instructions a notification between identical runs (N = 3000 minus N = 1000, over 2000):
  valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
      python bench/tracing_cost.py --count 3000 --records --in-process --per-connection 1

It imports the gateway it finds (``PYTHONPATH=/path/to/other/tree`` measures another revision);
revisions whose ``server_span`` took the certificate's fields (before the lean spans) are called
that way. ``--records``: the spans as the listener and the dispatcher make them since issue
24's plain records (``Tracing.notified`` and ``Tracing.attempts``, encoded into spans by the
exporter); without it, the notification's spans are API spans (as the embedded app makes
them) and its attempt is an API span where the revision still has ``Tracing.attempt_spans``,
else a record (the dispatcher makes nothing else). The process's CPU (all threads, the
exporter's too) over ``--count`` notifications, with the start-up (imports, the exporter's
set-up) measured apart and left out.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import time
from typing import Any

from gateway.config import TracingConfig
from gateway.tracing import Tracing
from gateway.tracing.export import Exporting

NOT_AFTER = "Jun  1 12:00:00 2027 GMT"


def _server_span(tracing: Any, path: str) -> Any:
    """``server_span`` as this revision takes it, as a function of the connection's
    attributes (its signature read once: reading it costs more than a span)."""
    if len(inspect.signature(tracing.server_span).parameters) == 4:
        # The revision before the lean spans: (path, cn, not_after, foreign).
        return lambda attributes: lambda: tracing.server_span(path, "meta", NOT_AFTER, None)
    return lambda attributes: lambda: tracing.server_span(path, attributes, None)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000, help="notifications (default 20000)")
    parser.add_argument("--endpoint", help="the collector's base URL (but with --in-process)")
    parser.add_argument(
        "--records", action="store_true", help="the listener's records (Tracing.notified)"
    )
    parser.add_argument(
        "--per-connection",
        type=int,
        default=0,
        help="notifications per connection: the connection's attributes made anew (and"
        " encoded anew) after each such run, as the listener makes them at each handshake"
        " (default 0: one connection for the whole run)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="with --records: each record encoded on this thread as it ends, as the exporter's"
        " thread would, and not exported: no thread whose timing moves the instruction count",
    )
    args = parser.parse_args()
    if args.in_process and not args.records:
        parser.error("--in-process goes with --records")
    if args.endpoint is None and not args.in_process:
        parser.error("--endpoint URL, or --records --in-process")
    started = time.process_time()
    exporting: Any = None
    if args.in_process:
        from gateway.tracing.encoding import Encoder

        encoder = Encoder({"service.name": "bench"}, "gateway", "1")

        def encode(record: Any) -> None:
            (encoder.attempts if hasattr(record, "headers") else encoder.notified)(record)

        tracing = Tracing(lambda span: None, 1.0, encode)
    else:
        exporting = Exporting(TracingConfig(enabled=True, endpoint=args.endpoint))
        tracing = exporting.tracing
    attributes: Any = None
    connection: Any = None
    try:
        from gateway.tracing import server_attributes  # type: ignore[attr-defined,unused-ignore]

        def connection(port: int) -> Any:
            return server_attributes(
                "/webhook", "meta", NOT_AFTER, "127.0.0.1", ("127.0.0.1", port)
            )

        attributes = connection(40000)
    except ImportError:
        pass
    spans_of = _server_span(tracing, "/webhook")
    server_span = spans_of(attributes)
    set_up = time.process_time() - started
    started = time.process_time()
    for number in range(args.count):
        if args.per_connection and connection and number % args.per_connection == 0:
            # A new connection: another client port (at most 64k of them, as on one host).
            attributes = connection(1024 + number // args.per_connection % 64000)
            server_span = spans_of(attributes)
        if args.records:
            record = tracing.notified("/webhook", attributes, None)
            record.committing()
            stored = tracing.stored_notified(record)
            record.committed([number])
            tracing.end_notified(record, 200)
        else:
            server = server_span()
            commit = tracing.commit_span(server)
            stored = tracing.stored(server)
            tracing.committed(commit, 1)
            commit.end()
            Tracing.end_server(server, 200)
        target = ("http://127.0.0.1:9000/webhook", "sink", [(f"p-{number}", stored, 1)])
        if args.records or not hasattr(tracing, "attempt_spans"):
            attempts = tracing.attempts(*target)
            assert attempts.headers[0]["traceparent"]
            tracing.end_attempts(attempts, [(200, None, "delivered")])
        else:
            ((attempt, headers),) = tracing.attempt_spans(*target)
            assert headers["traceparent"]
            Tracing.end_attempt(attempt, 200, None, "delivered")
        if number % 64 == 63 and exporting is not None:
            # The exporter's thread runs while the event loop waits for the network; this
            # loop never waits, so it lets it run here (sleeping costs no CPU).
            await asyncio.sleep(0.001)
    if exporting is not None:
        await exporting.close()
    spent = time.process_time() - started
    print(
        json.dumps(
            {
                "count": args.count,
                "us_cpu_per_notification": round(spent / args.count * 1e6, 1),
                "set_up_ms": round(set_up * 1e3, 1),
                "dropped": getattr(getattr(exporting, "batches", None), "dropped", None),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
