"""The benchmark counts the round trips of each kind of one-statement call, lone or coalesced,
from pg_stat_statements' rows (bench.run.hot_path_round_trips)."""

from __future__ import annotations

from bench.pg import Statement
from bench.run import hot_path_round_trips
from billing_service.storage.postgres_hot_path import (
    COMMIT_BATCH,
    RELEASE,
    RELEASE_BATCH,
    RESERVE,
    DriverStatement,
)


def _row(query: str, calls: int) -> Statement:
    return Statement(query, calls, 1.0, calls, 0)


def test_lone_statements_and_batches_are_counted_per_kind() -> None:
    # pg_stat_statements shows the text as prepared, whitespace and all.
    statements = [
        _row(DriverStatement.of(RESERVE).sql, 70),
        _row(DriverStatement.of(RELEASE).sql, 4),
        _row(RELEASE_BATCH.call_sql, 3),
        _row(COMMIT_BATCH.call_sql, 20),
        _row("SELECT 1", 9),
    ]
    counted = hot_path_round_trips(statements, rpcs=200)
    assert {kind: (c["statements"], c["batches"]) for kind, c in counted.items()} == {
        "reserve": (70, 0),
        "commit": (0, 20),
        "release": (4, 3),
    }
    assert counted["release"]["round_trips"] == 7
    assert counted["release"]["round_trips_per_rpc"] == 7 / 200
