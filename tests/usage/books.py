"""The rollups restated from the usage records, to check them against the table."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_service.storage.rollups import utc_day
from billing_service.storage.tables import usage_records, usage_rollups

_SUMMED = (
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "cost_micros",
    "charged_micros",
)


async def rollup_problems(engine: AsyncEngine) -> list[str]:
    """Every rollup row that differs from the sum of its usage records (empty when all agree)."""
    async with engine.connect() as conn:
        records = list(await conn.execute(select(usage_records)))
        rollups = list(await conn.execute(select(usage_rollups)))
    expected: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0] * 6)
    for row in records:
        key = (row.tenant_id, utc_day(row.committed_at), row.model, row.user_id)
        sums = expected[key]
        sums[0] += 1
        for index, name in enumerate(_SUMMED, start=1):
            sums[index] += getattr(row, name)
    actual = {
        (row.tenant_id, row.day, row.model, row.user_id): [
            row.call_count,
            *(getattr(row, name) for name in _SUMMED),
        ]
        for row in rollups
    }
    problems = []
    for key in sorted(set(expected) | set(actual), key=str):
        if expected.get(key) != actual.get(key):
            problems.append(f"{key}: records sum to {expected.get(key)}, rollup {actual.get(key)}")
    return problems
