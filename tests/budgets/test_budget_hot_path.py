"""The one-statement PostgreSQL reservation with budgets, when a budget fills between the
statement's snapshot and the lock on its row: the statement aborts itself, keeps nothing, and
the general transaction decides."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_service.budget_core import BudgetCore
from billing_service.core import BillingCore
from billing_service.domain.budgets import BudgetPeriod, BudgetScope, SetBudget
from billing_service.domain.commands import CreateTenant, Reserve
from billing_service.domain.model import DenialReason
from billing_service.domain.page_tokens import PageTokens
from billing_service.storage.budget_store import BudgetStore
from billing_service.storage.tables import budget_periods
from tests.ledger.books import money
from tests.ledger.conftest import TOKENS
from tests.support.clock import FakeClock
from tests.support.postgres import until_a_session_waits_for_a_lock


@pytest.fixture
def backend() -> str:
    return "postgresql"


async def test_a_budget_filled_after_the_snapshot_aborts_the_statement_and_denies(
    core: BillingCore, engine: AsyncEngine, clock: FakeClock
) -> None:
    await core.create_tenant(CreateTenant("c", "acme", 10_000_000, payment_method_on_file=True))
    budgets = BudgetCore(BudgetStore(engine), clock, PageTokens.random())
    await budgets.set_budget(
        SetBudget("b", "acme", BudgetScope.USER, "alice", 1_000_000, BudgetPeriod.DAY)
    )
    first = await core.reserve(Reserve("r1", "acme", "alice", TOKENS, amount_micros=100_000))
    assert first.decision.allowed
    period = budget_periods.c.scope_id == "alice"

    async with engine.connect() as blocker:
        transaction = await blocker.begin()
        # Fills the budget, uncommitted: the next reservation's snapshot still sees room.
        await blocker.execute(update(budget_periods).where(period).values(spent_micros=900_000))
        reserving = asyncio.create_task(
            core.reserve(Reserve("r2", "acme", "alice", TOKENS, amount_micros=100_000))
        )
        await until_a_session_waits_for_a_lock(engine)
        await transaction.commit()
    second = await reserving

    assert second.decision.reason is DenialReason.USER_BUDGET_EXHAUSTED
    assert second.decision.exhausted_budget is not None
    assert second.decision.exhausted_budget.remaining_micros == 0
    # Nothing of the aborted statement was kept: only r1 is held.
    assert await money(engine, "acme") == (0, 100_000)
    async with engine.begin() as conn:
        # Gives back what the test wrote behind the ledger's back, so the books balance.
        await conn.execute(update(budget_periods).where(period).values(spent_micros=0))
