"""The benchmark's profile buckets name code that exists, so its breakdown stays true."""

from __future__ import annotations

import re
import ssl
import threading
from pathlib import Path

import aiohttp
import pytest
from repo_scripts import ROOT, load_script

BENCH = load_script("bench/bench.py", "bench_script")
SOURCE = "\n".join(path.read_text() for path in (ROOT / "gateway").rglob("*.py"))


@pytest.mark.parametrize(("part", "key"), [pytest.param(*rule, id=rule[1]) for rule in BENCH.PARTS])
def test_profile_bucket_key_names_existing_code(part: str, key: str) -> None:
    """Every key names something that exists: a function of ours (in the file named with it),
    a file or folder of ours, a thread we name, or the library code it stands for. A renamed
    function would silently move its samples to "other"; a key of a kind not listed here fails,
    so that none goes unchecked."""
    function = re.fullmatch(r"(\w+) \((gateway/[\w/]+\.py)", key)
    ours = re.fullmatch(r"(\w+) \(", key)
    if function is not None:
        name, path = function.groups()
        assert re.search(rf"\bdef {name}\(", (ROOT / path).read_text()), (part, key)
    elif ours is not None:
        assert re.search(rf"\bdef {ours.group(1)}\(", SOURCE), (part, key)
    elif key.startswith("gateway/"):
        assert (ROOT / key).exists(), (part, key)
    elif key == "outbox-writer":  # the SQLite writer thread's name
        assert f'name="{key}"' in SOURCE, (part, key)
    elif key == "aiohttp/web_":  # aiohttp's server modules
        assert list(Path(aiohttp.__file__).parent.glob("web_*.py")), (part, key)
    elif key == "SSLObject.do_handshake":
        assert callable(getattr(ssl.SSLObject, "do_handshake", None)), (part, key)
    elif key == "MainThread;":  # py-spy's name for the event loop's thread
        assert threading.main_thread().name == "MainThread", (part, key)
    else:
        pytest.fail(f"{key!r} ({part}): a kind of key this test does not check")


def test_dispatch_stacks_are_selected_by_an_existing_folder() -> None:
    """The dispatcher's own profile selects stacks by a folder of the package that exists."""
    for key in BENCH.DISPATCH:
        assert (ROOT / key).is_dir(), key


STAGES = load_script("bench/stages.py", "bench_stages")
ROOT_FRAMES = ("Runner.run (asyncio/runners.py:118)",)


@pytest.mark.parametrize(
    ("thread", "leaf_frames", "stage"),
    [
        (
            "MainThread",
            [
                "_Connection.data_received (gateway/edge/listener.py:230)",
                "Callback.identify (gateway/edge/callback.py:90)",
                "SSLObject.getpeercert (ssl.py:950)",
            ],
            "identity",
        ),
        (
            "MainThread",
            [
                "Callback.notify (gateway/edge/callback.py:101)",
                "verify_signature (gateway/edge/signature.py:50)",
            ],
            "signature",
        ),
        (
            "MainThread",
            ["Callback.notify (gateway/callback.py:80)", "route (gateway/routing.py:120)"],
            "JSON and routing",
        ),
        (
            "MainThread",
            [
                "_Connection._answer (gateway/edge/listener.py:452)",
                "_Connection._write (gateway/edge/listener.py:470)",
                "SSLObject.write (ssl.py:930)",
            ],
            "TLS records",
        ),
        (
            "MainThread",
            [
                "_Connection._notified (gateway/edge/listener.py:440)",
                "_Connection._answer (gateway/edge/listener.py:452)",
            ],
            "response",
        ),
        (
            "MainThread",
            [
                "_Connection.data_received (gateway/edge/listener.py:230)",
                "_Connection.on_header (gateway/edge/listener.py:280)",
            ],
            "HTTP framing",
        ),
        (
            "MainThread",
            [
                "Dispatcher._attempt (gateway/delivery/dispatcher.py:350)",
                "SqliteOutbox.record_many (gateway/outbox/sqlite/outbox.py:165)",
            ],
            "recording the outcome",
        ),
        (
            "MainThread",
            [
                "Dispatcher._claim (gateway/delivery/dispatcher.py:270)",
                "SqliteOutbox.due (gateway/outbox/sqlite/outbox.py:130)",
            ],
            "claim",
        ),
        (
            "MainThread",
            [
                "Dispatcher._attempt (gateway/delivery/dispatcher.py:350)",
                "Upstream.post_many (gateway/delivery/upstream.py:220)",
            ],
            "upstream request and answer",
        ),
        (
            "outbox-writer",
            [
                "Writer._commit (gateway/outbox/sqlite/writer.py:370)",
                "insert_notification (gateway/outbox/sqlite/store.py:90)",
            ],
            "outbox hand-off and commit",
        ),
        (
            "outbox-writer",
            [
                "Writer._commit (gateway/outbox/sqlite/writer.py:370)",
                "record_attempts (gateway/outbox/sqlite/store.py:200)",
            ],
            "recording the outcome",
        ),
        ("MainThread", [], "event loop and I/O"),
        ("asyncio_0", ["Thread.run (threading.py:982)"], "other threads"),
    ],
)
def test_a_sample_counts_for_the_stage_of_its_innermost_known_frame(
    thread: str, leaf_frames: list[str], stage: str
) -> None:
    """The innermost frame a rule knows decides: HMAC inside the callback is the signature,
    the TLS write inside an answer is the TLS records, the writer's statements their job."""
    assert STAGES.stage_of(thread, [*ROOT_FRAMES, *leaf_frames]) == stage


def test_thread_cpu_is_shared_by_its_samples_and_divided_by_the_requests() -> None:
    """Each thread's CPU time goes to its stages in proportion to their samples; a thread that
    used CPU without a sample is shown as such, not dropped."""
    raw = [
        "thread (10): MainThread;Runner.run (asyncio/runners.py:118);"
        "verify_signature (gateway/edge/signature.py:50) 1",
        "thread (10): MainThread;Runner.run (asyncio/runners.py:118) 3",
        "thread (0x14): outbox-writer;insert_notification (gateway/outbox/sqlite/store.py:90) 5",
    ]
    samples = STAGES.samples_by_thread(raw)
    figures = STAGES.per_request(samples, {10: 0.004, 20: 0.001, 30: 0.002}, 100)
    assert figures == pytest.approx(
        {
            "signature": 10.0,
            "event loop and I/O": 30.0,
            "outbox hand-off and commit": 10.0,
            "threads not sampled": 20.0,
        }
    )


FUNCTION_RULES = [
    text for _, texts in STAGES.STAGES for text in texts if re.fullmatch(r"\.?\w+ \(", text)
]


@pytest.mark.parametrize("text", FUNCTION_RULES)
def test_stage_rule_names_a_function_that_exists(text: str) -> None:
    """A stage rule naming a function names one the package (or ssl) defines: a renamed function
    would silently move its samples to another stage."""
    name = text.strip(". (")
    library = Path(ssl.__file__).read_text()
    assert re.search(rf"\bdef {name}\(", SOURCE + library), text
