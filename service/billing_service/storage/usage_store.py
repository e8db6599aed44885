"""The dashboard's reads: period usage from the rollups, keyset pages of records and entries.

Every query is bounded by an index: usage_rollups by its primary key (tenant_id, day, ...),
usage_records by (tenant_id, committed_at, hold_id), ledger_entries by (tenant_id, entry_id).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    String,
    cast,
    func,
    literal,
    select,
    tuple_,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_service.domain.model import Account, UsageRecord
from billing_service.storage.database import storage_faults_unavailable
from billing_service.storage.ledger_rows import usage_from_row
from billing_service.storage.ledger_store import LedgerStore
from billing_service.storage.tables import charges, ledger_entries, usage_records, usage_rollups
from billing_service.usage import (
    LedgerEntryView,
    LedgerFilter,
    PeriodUsage,
    RecordPosition,
    UsageFilter,
    UsageTotals,
)

_SUMS = (
    "call_count",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "cost_micros",
    "charged_micros",
)


class UsageStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._ledger = LedgerStore(engine)
        postgres = engine.dialect.name == "postgresql"
        # As in LedgerStore: PostgreSQL reads need no BEGIN/ROLLBACK round trips.
        self._reads = engine.execution_options(isolation_level="AUTOCOMMIT") if postgres else engine

    async def get_account(self, tenant_id: str) -> Account | None:
        return await self._ledger.get_account(tenant_id)

    @storage_faults_unavailable
    async def period_usage(
        self, tenant_id: str, first_day: date, end_day: date, user_limit: int
    ) -> PeriodUsage:
        in_period = (
            usage_rollups.c.tenant_id == tenant_id,
            usage_rollups.c.day >= first_day,
            usage_rollups.c.day < end_day,
        )
        async with self._reads.connect() as conn:
            by_model = await conn.execute(_grouped(usage_rollups.c.model, in_period))
            models = [(row[0], _totals(row)) for row in by_model]
            by_user = await conn.execute(
                _grouped(usage_rollups.c.user_id, in_period).limit(user_limit + 1)
            )
            users = [(row[0], _totals(row)) for row in by_user]
        return PeriodUsage(models, users[:user_limit], len(users) > user_limit)

    @storage_faults_unavailable
    async def usage_records(
        self,
        where: UsageFilter,
        after: RecordPosition | None,
        limit: int,
        *,
        newest_first: bool,
    ) -> Sequence[UsageRecord]:
        c = usage_records.c
        query = select(usage_records).where(c.tenant_id == where.tenant_id)
        if where.start is not None:
            query = query.where(c.committed_at >= where.start)
        if where.end is not None:
            query = query.where(c.committed_at < where.end)
        if where.model:
            query = query.where(c.model == where.model)
        if where.user_id:
            query = query.where(c.user_id == where.user_id)
        key = tuple_(c.committed_at, c.hold_id)
        if after is not None:
            position = tuple_(
                literal(after.committed_at, c.committed_at.type), literal(after.hold_id, String())
            )
            query = query.where(key < position if newest_first else key > position)
        if newest_first:
            query = query.order_by(c.committed_at.desc(), c.hold_id.desc())
        else:
            query = query.order_by(c.committed_at, c.hold_id)
        async with self._reads.connect() as conn:
            rows = await conn.execute(query.limit(limit))
            return [usage_from_row(row) for row in rows]

    @storage_faults_unavailable
    async def ledger_entries(
        self, where: LedgerFilter, before_entry_id: int | None, limit: int
    ) -> Sequence[LedgerEntryView]:
        c = ledger_entries.c
        query = (
            select(ledger_entries, charges.c.payment_intent_id)
            .select_from(ledger_entries.outerjoin(charges, charges.c.charge_id == c.charge_id))
            .where(c.tenant_id == where.tenant_id)
        )
        if where.start is not None:
            query = query.where(c.created_at >= where.start)
        if where.end is not None:
            query = query.where(c.created_at < where.end)
        if where.kinds:
            query = query.where(c.kind.in_(where.kinds))
        if before_entry_id is not None:
            query = query.where(c.entry_id < before_entry_id)
        query = query.order_by(c.entry_id.desc()).limit(limit)
        async with self._reads.connect() as conn:
            return [_entry_view(row) for row in await conn.execute(query)]


def _grouped(key: Any, in_period: Sequence[ColumnElement[bool]]) -> Select[Any]:
    """Sums per `key`, costliest first (ties by key, so pages of equal cost are stable)."""
    sums = [cast(func.sum(usage_rollups.c[name]), BigInteger).label(name) for name in _SUMS]
    return (
        select(key, *sums)
        .where(*in_period)
        .group_by(key)
        .order_by(func.sum(usage_rollups.c.cost_micros).desc(), key)
    )


def _totals(row: Any) -> UsageTotals:
    return UsageTotals(*(int(getattr(row, name)) for name in _SUMS))


def _entry_view(row: Any) -> LedgerEntryView:
    return LedgerEntryView(
        entry_id=row.entry_id,
        kind=row.kind,
        balance_delta_micros=row.balance_delta_micros,
        held_delta_micros=row.held_delta_micros,
        balance_after_micros=row.balance_after_micros,
        available_after_micros=row.available_after_micros,
        hold_id=row.hold_id,
        memo=row.memo,
        created_at=row.created_at,
        charge_id=row.charge_id,
        payment_intent_id=row.payment_intent_id,
    )
