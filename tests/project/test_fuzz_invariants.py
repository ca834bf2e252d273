"""The fuzz target's invariants hold on Meta's samples and their simple mutations (the
coverage-guided run itself is ``fuzz/run.sh``, outside the default test run)."""

from __future__ import annotations

from pathlib import Path

import pytest
from repo_scripts import ROOT, load_script

SAMPLES = sorted((ROOT / "examples").glob("*.json"))


INVARIANTS = load_script("fuzz/edge_invariants.py", "edge_invariants")
CHECK = INVARIANTS.check_body
CHECK_STREAM = INVARIANTS.check_stream
STREAM_SEEDS = sorted((ROOT / "fuzz" / "http1-seeds").glob("*.http"))


def test_there_are_samples_to_seed_the_fuzzer_with() -> None:
    """The seeds exist (so the other tests check something)."""
    assert len(SAMPLES) >= 30


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.stem for s in SAMPLES])
def test_invariants_hold_on_each_sample_and_its_mutations(sample: Path) -> None:
    """Each sample, truncated, doubled, nested deeper and with a byte flipped, keeps every
    invariant: routed as it should be or refused with 400, never a crash."""
    body = sample.read_bytes()
    for variant in (
        body,
        body[: len(body) // 2],
        body + body,
        b"[" * 3000 + body + b"]" * 3000,
        body.replace(b'"', b"'", 1),
        bytes([body[0] ^ 0x80]) + body[1:],
        body.replace(b"}", b"}}", 1),
    ):
        CHECK(variant)


@pytest.mark.parametrize("seed", STREAM_SEEDS, ids=[s.stem for s in STREAM_SEEDS])
def test_stream_invariants_hold_on_each_seed_and_its_mutations(seed: Path) -> None:
    """Each request stream, truncated, doubled, with a byte flipped or a line end dropped,
    gives the events of one read however it is cut, and at most one refusal, last."""
    data = seed.read_bytes()
    for variant in (
        data,
        data[: len(data) // 2],
        data + data,
        bytes([data[0] ^ 0x20]) + data[1:],
        data.replace(b"\r\n", b"\n", 1),
        data.replace(b"1.1", b"1.0"),
        b"\r\n" + data,
    ):
        CHECK_STREAM(variant)


def test_there_are_request_streams_to_seed_the_http1_fuzzer_with() -> None:
    """The seeds exist (so the test above checks something)."""
    assert len(STREAM_SEEDS) >= 8
