"""The books audit (storage.audit, run by the tests and in the background by the service) finds
every counter that disagrees with the ledger entries and open holds, names only the tenant whose
books disagree, and finds nothing on healthy books, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import logging

import pytest
from sqlalchemy import Executable, update
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_service.books_audit import BooksAuditor
from billing_service.budget_core import BudgetCore
from billing_service.core import BillingCore
from billing_service.domain.budgets import BudgetPeriod, BudgetScope, SetBudget
from billing_service.domain.commands import Commit, CreateTenant, Reserve
from billing_service.domain.page_tokens import PageTokens
from billing_service.domain.pricing import TokenUsage
from billing_service.metrics import Metrics
from billing_service.storage.audit import FindingKind, audit_books
from billing_service.storage.budget_store import BudgetStore
from billing_service.storage.tables import budget_periods, holds, tenants
from tests.ledger.books import assert_books_balance
from tests.ledger.conftest import TOKENS
from tests.support.clock import FakeClock

ACME, BETA = "acme", "beta"


async def _books_with_every_kind_of_row(
    core: BillingCore, engine: AsyncEngine, clock: FakeClock
) -> str:
    """Two tenants with a budget, a committed hold and an open hold each; returns acme's open
    hold."""
    budgets = BudgetCore(BudgetStore(engine), clock, PageTokens.random())
    open_hold = ""
    for tenant in (ACME, BETA):
        await core.create_tenant(
            CreateTenant(f"create-{tenant}", tenant, 10_000_000, payment_method_on_file=True)
        )
        await budgets.set_budget(
            SetBudget(
                f"budget-{tenant}", tenant, BudgetScope.USER, "alice", 5_000_000, BudgetPeriod.DAY
            )
        )
        committed = await core.reserve(
            Reserve(f"r1-{tenant}", tenant, "alice", TOKENS, amount_micros=400_000)
        )
        assert committed.hold is not None
        await core.commit(
            Commit(
                f"c1-{tenant}",
                committed.hold.hold_id,
                TokenUsage(input_tokens=1_000, output_tokens=10_000),
            )
        )
        held = await core.reserve(
            Reserve(f"r2-{tenant}", tenant, "alice", TOKENS, amount_micros=300_000)
        )
        assert held.hold is not None
        if tenant == ACME:
            open_hold = held.hold.hold_id
    await assert_books_balance(engine)
    return open_hold


async def _restore(engine: AsyncEngine, *statements: Executable) -> None:
    """Puts the books back, so the fixture's own audit at the end finds them balanced."""
    async with engine.begin() as conn:
        for statement in statements:
            await conn.execute(statement)
    assert (await audit_books(engine)).findings == ()


def _limit(tenant: str, micros: int) -> Executable:
    return update(tenants).where(tenants.c.tenant_id == tenant).values(credit_limit_micros=micros)


# Each corruption: a statement that moves one of acme's counters by one micro, and what the
# audit must call it.
CORRUPTIONS = {
    "tenant balance": (
        lambda _hold, d: (
            update(tenants)
            .where(tenants.c.tenant_id == ACME)
            .values(balance_micros=tenants.c.balance_micros + d)
        ),
        {FindingKind.BALANCE},
    ),
    "tenant held": (
        lambda _hold, d: (
            update(tenants)
            .where(tenants.c.tenant_id == ACME)
            .values(held_micros=tenants.c.held_micros - d)
        ),
        {FindingKind.HELD, FindingKind.OPEN_HOLDS},
    ),
    "open hold amount": (
        lambda hold, d: (
            update(holds)
            .where(holds.c.hold_id == hold)
            .values(amount_micros=holds.c.amount_micros + d)
        ),
        {FindingKind.OPEN_HOLDS, FindingKind.BUDGET_PERIOD},
    ),
    "budget spent": (
        lambda _hold, d: (
            update(budget_periods)
            .where(budget_periods.c.tenant_id == ACME)
            .values(spent_micros=budget_periods.c.spent_micros + d)
        ),
        {FindingKind.BUDGET_PERIOD},
    ),
    "budget held": (
        lambda _hold, d: (
            update(budget_periods)
            .where(budget_periods.c.tenant_id == ACME)
            .values(held_micros=budget_periods.c.held_micros - d)
        ),
        {FindingKind.BUDGET_PERIOD},
    ),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
async def test_a_counter_one_micro_off_is_found_for_its_tenant_only(
    corruption: str, core: BillingCore, engine: AsyncEngine, clock: FakeClock
) -> None:
    open_hold = await _books_with_every_kind_of_row(core, engine, clock)
    healthy = await audit_books(engine)
    assert (healthy.tenants_audited, healthy.findings) == (2, ())

    statement, kinds = CORRUPTIONS[corruption]
    async with engine.begin() as conn:
        await conn.execute(statement(open_hold, 1))

    audit = await audit_books(engine)
    assert audit.tenants_disagreeing == {ACME}
    assert {finding.kind for finding in audit.findings} == kinds
    assert audit.tenants_over_credit_limit == set()

    await _restore(engine, statement(open_hold, -1))


async def test_a_limit_lowered_under_open_holds_is_over_the_limit_not_disagreeing(
    core: BillingCore, engine: AsyncEngine, clock: FakeClock
) -> None:
    await _books_with_every_kind_of_row(core, engine, clock)
    async with engine.begin() as conn:
        await conn.execute(_limit(BETA, 0))

    audit = await audit_books(engine)
    assert audit.tenants_disagreeing == set()
    assert audit.tenants_over_credit_limit == {BETA}
    assert [finding.kind for finding in audit.findings] == [FindingKind.OVER_CREDIT_LIMIT]
    assert audit.problems(check_exposure=False) == []
    await _restore(engine, _limit(BETA, 10_000_000))


async def test_the_service_exports_and_logs_what_the_audit_found(
    core: BillingCore, engine: AsyncEngine, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    open_hold = await _books_with_every_kind_of_row(core, engine, clock)
    metrics = Metrics()
    auditor = BooksAuditor(engine, metrics)

    await auditor.audit_once()
    assert metrics.registry.get_sample_value("billing_books_audit_tenants_disagreeing") == 0
    assert (
        metrics.registry.get_sample_value("billing_books_audit_last_success_timestamp_seconds") or 0
    ) > 0

    async with engine.begin() as conn:
        await conn.execute(CORRUPTIONS["open hold amount"][0](open_hold, 1))
        await conn.execute(_limit(BETA, 0))
    with caplog.at_level(logging.INFO, logger="billing_service.books_audit"):
        await auditor.audit_once()

    assert metrics.registry.get_sample_value("billing_books_audit_tenants_disagreeing") == 1
    assert metrics.registry.get_sample_value("billing_books_audit_tenants_over_credit_limit") == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors
    assert {getattr(r, "tenant_id", None) for r in errors} == {ACME}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [getattr(r, "tenant_id", None) for r in warnings] == [BETA]
    await _restore(
        engine, CORRUPTIONS["open hold amount"][0](open_hold, -1), _limit(BETA, 10_000_000)
    )


async def test_the_audit_leaves_the_service_its_connections(
    core: BillingCore, engine: AsyncEngine, clock: FakeClock
) -> None:
    # SQLite's pool has one connection, which readiness checks and reads share: an audit that
    # took it for its whole scan would make the replica not ready for as long.
    await _books_with_every_kind_of_row(core, engine, clock)
    pool_size = engine.sync_engine.pool.size()  # type: ignore[attr-defined]
    held = [await engine.connect() for _ in range(pool_size)]
    try:
        audit = await asyncio.wait_for(audit_books(engine), timeout=20)
    finally:
        for conn in held:
            await conn.close()
    assert (audit.tenants_audited, audit.findings) == (2, ())
