"""What the admin guards add where they run on every request or delivery, before and after, in
alternating rounds in one process: the text log's access line (escaping control characters),
and what the outbox keeps of a target's answer (masking, echo detection) against the plain
decode it replaced. Prints microseconds per call, the median of the rounds and their range.

    python bench/admin_costs.py [--rounds 7] [--payload PATH]

The payload defaults to the shared harness's 1338-byte inbound text message if given, else a
notification of the same shape built here.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import timeit
from collections.abc import Callable
from pathlib import Path

from gateway.delivery.answers import kept_answer
from gateway.runtime.logs import text_formatter

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # the formatter before


def _payload(path: Path | None) -> bytes:
    if path is not None:
        return path.read_bytes()
    message = {"from": "16505551234", "id": "wamid.x", "type": "text", "text": {"body": "hi" * 40}}
    value: dict[str, object] = {
        "contacts": [{"profile": {"name": "Kerry Fisher"}, "wa_id": "16505551234"}]
    }
    value["messages"] = [message]
    change = {"field": "messages", "value": value}
    return json.dumps({"entry": [{"id": "1", "changes": [change]}]}).encode()


def _access_record() -> logging.LogRecord:
    args = ("127.0.0.1", "POST", "/webhook", 200, 3, 0.0012, "client.webhooks.fbclientcerts.com")
    return logging.LogRecord(
        "gateway.access", logging.INFO, __file__, 1, "%s %s %s %d %sB %.1fms %s", args, None
    )


def _per_call_us(call: Callable[[], object], number: int) -> float:
    return timeit.timeit(call, number=number) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--payload", type=Path)
    args = parser.parse_args()
    body = _payload(args.payload)
    record = _access_record()
    before_log, after_log = logging.Formatter(_TEXT_FORMAT), text_formatter()
    error = json.dumps({"error": "unknown account", "code": "E_1" * 30}).encode()
    answers = {
        "200, 'ok'": (200, b"ok"),
        "200, JSON 120 B": (200, error),
        "422, JSON 120 B": (422, error),
        "400, echo of the body": (400, body[:1024]),
    }
    cases: dict[str, tuple[Callable[[], object], Callable[[], object], int]] = {
        # The same work in both columns: how busy the machine was, and how far apart the
        # columns drift by noise alone.
        "control: sum(range(1000))": (lambda: sum(range(1000)), lambda: sum(range(1000)), 2000),
        "access line (text log)": (
            lambda: before_log.format(record),
            lambda: after_log.format(record),
            20000,
        ),
    }
    for name, (status, answer) in answers.items():
        cases[f"kept answer: {name}"] = (
            lambda answer=answer: answer.decode("utf-8", "replace"),  # type: ignore[misc]
            lambda s=status, a=answer: kept_answer(body, s, "application/json", a),  # type: ignore[misc]
            2000,
        )
    results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in cases}
    for _ in range(args.rounds):
        for name, (before, after, number) in cases.items():
            results[name][0].append(_per_call_us(before, number))
            results[name][1].append(_per_call_us(after, number))
    out = io.StringIO()
    out.write(f"payload {len(body)} B, {args.rounds} alternating rounds; us per call\n")
    out.write(f"{'case':<34} {'before (median, min..max)':>28} {'after (median, min..max)':>28}\n")
    for name, (times_before, times_after) in results.items():
        cells = [
            f"{statistics.median(v):8.2f} ({min(v):.2f}..{max(v):.2f})"
            for v in (times_before, times_after)
        ]
        out.write(f"{name:<34} {cells[0]:>28} {cells[1]:>28}\n")
    print(out.getvalue(), end="")


if __name__ == "__main__":
    main()
