"""The usage rollup of a commit: one upsert into usage_rollups, in the commit's transaction.

A usage record adds to the row of its tenant, UTC day (of committed_at), model and user. The
PostgreSQL one-statement commit (storage.postgres_hot_path) restates this upsert in SQL;
tests/ledger/test_hot_path_agrees.py checks that both keep the rollups equal to the records.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from billing_service.domain.model import UsageRecord
from billing_service.storage.tables import usage_rollups

_SUMMED = (
    "call_count",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "cost_micros",
    "charged_micros",
)


def utc_day(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


def _upsert(dialect_insert: Any) -> Any:
    """The rollup upsert with bound values, built once per dialect (building it per call cost
    more CPU than running it on SQLite)."""
    statement = dialect_insert(usage_rollups)
    return statement.on_conflict_do_update(
        index_elements=[
            usage_rollups.c.tenant_id,
            usage_rollups.c.day,
            usage_rollups.c.model,
            usage_rollups.c.user_id,
        ],
        set_={name: usage_rollups.c[name] + statement.excluded[name] for name in _SUMMED},
    )


_UPSERTS = {"postgresql": _upsert(postgresql.insert), "sqlite": _upsert(sqlite.insert)}


async def add_to_rollup(conn: AsyncConnection, record: UsageRecord) -> None:
    usage = record.usage
    values = {
        "tenant_id": record.tenant_id,
        "day": utc_day(record.committed_at),
        "model": record.model,
        "user_id": record.user_id,
        "call_count": 1,
        "input_tokens": usage.input_tokens,
        "cached_input_tokens": usage.cached_input_tokens,
        "output_tokens": usage.output_tokens,
        "cost_micros": record.cost_micros,
        "charged_micros": record.charged_micros,
    }
    await conn.execute(_UPSERTS[conn.dialect.name], values)
