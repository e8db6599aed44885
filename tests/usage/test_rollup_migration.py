"""Migration 0004 sums the usage records that exist already into the rollups, per UTC day."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import insert, select

from billing_service.storage.database import create_engine
from billing_service.storage.migrations import alembic_config
from billing_service.storage.tables import holds, tenants, usage_records, usage_rollups
from tests.support.postgres import PostgresServer
from tests.usage.books import rollup_problems

_numbers = itertools.count()

# Two records late on January 31st (UTC) and one just after midnight.
TIMES = [
    datetime(2026, 1, 31, 23, 0, tzinfo=UTC),
    datetime(2026, 1, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    datetime(2026, 2, 1, 0, 0, 0, 1, tzinfo=UTC),
]


async def _write_records(url: str) -> None:
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                insert(tenants).values(
                    tenant_id="acme",
                    status="active",
                    credit_limit_micros=0,
                    payment_method_on_file=False,
                    created_at=TIMES[0],
                    updated_at=TIMES[0],
                )
            )
            for number, moment in enumerate(TIMES):
                hold_id = f"rsv_{number:032x}"
                await conn.execute(
                    insert(holds).values(
                        hold_id=hold_id,
                        request_id=f"r{number}",
                        request_fingerprint="fp",
                        tenant_id="acme",
                        user_id="ann",
                        model="m",
                        billing="included",
                        input_micros_per_mtok=0,
                        cached_input_micros_per_mtok=0,
                        output_micros_per_mtok=0,
                        flat_micros_per_call=0,
                        amount_micros=0,
                        status="committed",
                        decision_available_micros=0,
                        created_at=moment,
                        expires_at=moment,
                    )
                )
                await conn.execute(
                    insert(usage_records).values(
                        hold_id=hold_id,
                        request_id=f"c{number}",
                        request_fingerprint="fp",
                        tenant_id="acme",
                        user_id="ann",
                        model="m",
                        input_tokens=10 * (number + 1),
                        cached_input_tokens=number,
                        output_tokens=5,
                        cost_micros=100 + number,
                        charged_micros=0,
                        uncollected_micros=0,
                        held_micros=0,
                        payment_source="included",
                        reserved_at=moment,
                        committed_at=moment,
                        available_after_micros=0,
                    )
                )
    finally:
        await engine.dispose()


async def _rollups(url: str) -> tuple[list[str], list[tuple[object, ...]]]:
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                select(usage_rollups.c.day, usage_rollups.c.call_count).order_by("day")
            )
            found = [tuple(row) for row in rows]
        return await rollup_problems(engine), found
    finally:
        await engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_existing_records_are_rolled_up_by_utc_day(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        url = server.create_database(f"rollup_migration_{next(_numbers)}")
    command.upgrade(alembic_config(url), "0003")
    # The tables of revision 0001-0003 are those of today, less usage_rollups.
    asyncio.run(_write_records(url))
    command.upgrade(alembic_config(url), "head")
    problems, found = asyncio.run(_rollups(url))
    assert problems == []
    assert found == [(TIMES[0].date(), 2), (TIMES[2].date(), 1)]
