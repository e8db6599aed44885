"""bench/profile.py: py-spy's raw samples counted by part, thread and innermost function."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bench.profile import OTHER, PARTS, summarize

_FRAMES = {
    "gRPC (grpc.aio, its Cython)": "_handle (/x/site-packages/grpc/aio/_server.py:10)",
    "event-loop callbacks in C (gRPC's Cython, futures)": "Handle._run (/py/asyncio/events.py:80)",
    "SQLAlchemy (and its driver calls)": "do_execute (/x/sqlalchemy/engine/default.py:9)",
    "service: storage": "_place_hold (/w/service/billing_service/storage/holds.py:3)",
    "service: domain rules": "decide (/w/service/billing_service/domain/admission.py:3)",
    "asyncio loop, threads, queues": "_run_once (/py/asyncio/base_events.py:1)",
    "dataclasses": "fields (/usr/lib/python3.11/dataclasses.py:1)",
    OTHER: "mystery (/somewhere/else.py:1)",
}


@given(
    samples=st.lists(
        st.tuples(
            st.sampled_from(sorted(_FRAMES)),
            st.sampled_from(["MainThread", "writer-1"]),
            st.integers(1, 50),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_each_sample_counts_once_in_its_part_and_its_thread(
    samples: list[tuple[str, str, int]],
) -> None:
    lines = [
        f"thread (4{index}): {thread};main (/w/app.py:1);{_FRAMES[part]} {count}"
        for index, (part, thread, count) in enumerate(samples)
    ]
    profile = summarize([*lines, "not a sample line"])

    assert profile.samples == sum(count for _, _, count in samples)
    for part in _FRAMES:
        assert profile.parts.get(part, 0) == sum(c for p, _, c in samples if p == part)
    assert profile.threads.get("writer", 0) == sum(c for _, t, c in samples if t == "writer-1")
    assert sum(profile.leaves.values()) == profile.samples  # at most 8 distinct leaves here
    assert set(profile.parts) <= {part for part, _ in PARTS} | {OTHER}
