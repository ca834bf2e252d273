"""The share of notifications traced when ``[tracing] sample_ratio`` is not set: from
OpenTelemetry's ``OTEL_TRACES_SAMPLER`` and ``OTEL_TRACES_SAMPLER_ARG``.

Rule: pure; the two variables' text in, a ratio from 0 to 1 out, or :class:`SamplerUnknown`
naming the variable at fault. Of the specification's built-in samplers, those that make sense
for a gateway whose spans are all roots: Meta sends no ``traceparent``, and one sent by anyone
else is never trusted as a parent (only linked), so each ``parentbased_*`` sampler decides as
its root sampler does. ``jaeger_remote`` and ``xray`` need a sampling service the gateway does
not speak to: refused rather than guessed at. Without ``OTEL_TRACES_SAMPLER``,
``OTEL_TRACES_SAMPLER_ARG`` alone is the ratio (as before the sampler was read).
"""

from __future__ import annotations

import math
from typing import Final

__all__ = ["SAMPLERS", "SamplerUnknown", "sample_ratio"]

# Each sampler's ratio; None: the ratio is OTEL_TRACES_SAMPLER_ARG (1.0 when unset).
SAMPLERS: Final[dict[str, float | None]] = {
    "always_on": 1.0,
    "always_off": 0.0,
    "traceidratio": None,
    "parentbased_always_on": 1.0,
    "parentbased_always_off": 0.0,
    "parentbased_traceidratio": None,
}
_DEFAULT_RATIO: Final = 1.0


class SamplerUnknown(ValueError):
    """``variable`` holds ``value``, which is not ``expected``."""

    def __init__(self, variable: str, value: str, expected: str) -> None:
        super().__init__(f"{variable} = {value!r} is not {expected}")
        self.variable, self.value, self.expected = variable, value, expected


def sample_ratio(sampler: str | None, argument: str | None) -> float:
    """The ratio ``OTEL_TRACES_SAMPLER`` = ``sampler`` and ``OTEL_TRACES_SAMPLER_ARG`` =
    ``argument`` ask for (either None or empty: unset). The argument is read only where the
    sampler takes one (the ratio samplers, or no sampler named); the specification leaves it
    unused for the others."""
    name = (sampler or "").strip().lower()
    if name:
        if name not in SAMPLERS:
            expected = "one of " + ", ".join(SAMPLERS)
            raise SamplerUnknown("OTEL_TRACES_SAMPLER", sampler or "", expected)
        fixed = SAMPLERS[name]
        if fixed is not None:
            return fixed
    if not argument:
        return _DEFAULT_RATIO
    try:
        ratio = float(argument)
    except ValueError:
        ratio = math.nan
    if not 0 <= ratio <= 1:  # NaN too
        raise SamplerUnknown("OTEL_TRACES_SAMPLER_ARG", argument, "a number from 0 to 1")
    return ratio
