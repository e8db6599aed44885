"""bench.extend still measures: a few calls of each round on PostgreSQL, the audit clean after.
No speed is asserted."""

from __future__ import annotations

import uuid

import pytest

from bench.extend import measure
from billing_service.storage.migrations import migrate
from tests.support.postgres import PostgresServer

pytestmark = pytest.mark.slow


async def test_the_extension_benchmark_runs_and_leaves_the_books_balanced(
    postgres_server: PostgresServer,
) -> None:
    url = postgres_server.create_database(f"bench_extend_{uuid.uuid4().hex[:12]}")
    await migrate(url)
    result = await measure(url, calls=32, rounds=2, extensions_per_query=2)
    assert result["audit"] == []
    for callers in ("callers_1", "callers_16"):
        for comparison in result[callers].values():
            assert comparison["ratio"] > 0
