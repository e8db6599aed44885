"""The ledger audit: every invariant of the money, checked by SQL over the whole database.

Tests run it after every step of the property-based state machine; the benchmark runs it after
every load run. An empty result means the books balance.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_service.domain.model import HoldStatus
from billing_service.domain.pricing import ModelBilling
from billing_service.storage.credit_sql import available_credit_sql
from billing_service.storage.tables import holds, ledger_entries, tenants


async def audit_ledger(engine: AsyncEngine, *, check_exposure: bool = True) -> list[str]:
    """Returns one line per broken invariant (empty when every tenant's books balance).

    check_exposure: also report tenants whose exposure is above their credit limit. Only an
    operator lowering a limit below current exposure can cause that; pass False where a test
    does so on purpose.
    """
    entry_sums = (
        select(
            ledger_entries.c.tenant_id,
            func.coalesce(func.sum(ledger_entries.c.balance_delta_micros), 0).label("balance"),
            func.coalesce(func.sum(ledger_entries.c.held_delta_micros), 0).label("held"),
        )
        .group_by(ledger_entries.c.tenant_id)
        .subquery()
    )
    open_holds = (
        select(
            holds.c.tenant_id,
            func.coalesce(func.sum(holds.c.amount_micros), 0).label("held"),
        )
        .where(holds.c.status == HoldStatus.OPEN, holds.c.billing == ModelBilling.METERED)
        .group_by(holds.c.tenant_id)
        .subquery()
    )
    query = (
        select(
            tenants.c.tenant_id,
            tenants.c.balance_micros,
            tenants.c.held_micros,
            available_credit_sql().label("available"),
            func.coalesce(entry_sums.c.balance, 0).label("entries_balance"),
            func.coalesce(entry_sums.c.held, 0).label("entries_held"),
            func.coalesce(open_holds.c.held, 0).label("open_held"),
        )
        .select_from(
            tenants.outerjoin(entry_sums, entry_sums.c.tenant_id == tenants.c.tenant_id).outerjoin(
                open_holds, open_holds.c.tenant_id == tenants.c.tenant_id
            )
        )
        .order_by(tenants.c.tenant_id)
    )
    problems: list[str] = []
    async with engine.connect() as conn:
        for row in await conn.execute(query):
            who = f"tenant {row.tenant_id}"
            if row.balance_micros != row.entries_balance:
                problems.append(
                    f"{who}: balance {row.balance_micros} != sum of entries {row.entries_balance}"
                )
            if row.held_micros != row.entries_held:
                problems.append(
                    f"{who}: held {row.held_micros} != sum of entries {row.entries_held}"
                )
            if row.held_micros != row.open_held:
                problems.append(f"{who}: held {row.held_micros} != open holds {row.open_held}")
            if check_exposure and row.available < 0:
                problems.append(f"{who}: exposure over the credit limit by {-row.available} micros")
    return problems
