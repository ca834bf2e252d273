"""Which share of notifications is traced when ``[tracing] sample_ratio`` is not set: the
OpenTelemetry samplers of OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG, a pure decision."""

from __future__ import annotations

import pytest

from gateway.config.sampling import SamplerUnknown, sample_ratio


@pytest.mark.parametrize(
    ("sampler", "argument", "ratio"),
    [
        (None, None, 1.0),
        ("", "", 1.0),
        (None, "0.25", 0.25),  # the argument alone, as before the sampler was read
        ("always_on", None, 1.0),
        ("always_on", "0.1", 1.0),  # unused by this sampler
        ("always_off", None, 0.0),
        ("always_off", "0.9", 0.0),
        ("traceidratio", None, 1.0),
        ("traceidratio", "0.5", 0.5),
        ("traceidratio", "0", 0.0),
        ("traceidratio", "1", 1.0),
        ("parentbased_always_on", None, 1.0),
        ("parentbased_always_off", "0.5", 0.0),
        ("parentbased_traceidratio", "0.125", 0.125),  # every span here is a root
        (" TraceIdRatio ", "0.5", 0.5),
        ("always_on", "nonsense", 1.0),  # unused, so not read
    ],
)
def test_samplers_give_the_ratio_of_their_root_decision(
    sampler: str | None, argument: str | None, ratio: float
) -> None:
    """Each built-in sampler the gateway supports, with and without its argument."""
    assert sample_ratio(sampler, argument) == ratio


@pytest.mark.parametrize(
    ("sampler", "argument", "variable", "message"),
    [
        (
            "jaeger_remote",
            None,
            "OTEL_TRACES_SAMPLER",
            "OTEL_TRACES_SAMPLER = 'jaeger_remote' is not one of always_on, always_off,"
            " traceidratio, parentbased_always_on, parentbased_always_off,"
            " parentbased_traceidratio",
        ),
        ("xray", None, "OTEL_TRACES_SAMPLER", None),
        ("parentbased_jaeger_remote", None, "OTEL_TRACES_SAMPLER", None),
        ("sometimes", "0.5", "OTEL_TRACES_SAMPLER", None),
        (
            "traceidratio",
            "half",
            "OTEL_TRACES_SAMPLER_ARG",
            "OTEL_TRACES_SAMPLER_ARG = 'half' is not a number from 0 to 1",
        ),
        ("parentbased_traceidratio", "1.5", "OTEL_TRACES_SAMPLER_ARG", None),
        ("traceidratio", "-0.1", "OTEL_TRACES_SAMPLER_ARG", None),
        (None, "nan", "OTEL_TRACES_SAMPLER_ARG", None),
    ],
)
def test_an_unknown_sampler_or_bad_ratio_names_its_variable(
    sampler: str | None, argument: str | None, variable: str, message: str | None
) -> None:
    """A sampler the gateway cannot honour, or a ratio out of 0 to 1, is refused naming the
    variable at fault, never guessed at."""
    with pytest.raises(SamplerUnknown) as refused:
        sample_ratio(sampler, argument)
    assert refused.value.variable == variable
    if message is not None:
        assert str(refused.value) == message
