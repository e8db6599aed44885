"""Budgets move with the tenant's money: holds, commits, releases, expiry and refunds, on
SQLite and PostgreSQL, with the clock injected (periods roll over without sleeping)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_service.budget_core import BudgetCore
from billing_service.core import BillingCore
from billing_service.domain.budgets import BudgetPeriod, BudgetScope, DeleteBudget, SetBudget
from billing_service.domain.commands import (
    CheckAccess,
    Commit,
    CreateTenant,
    Refund,
    Release,
    Reserve,
)
from billing_service.domain.model import DenialReason
from billing_service.domain.page_tokens import PageTokens
from billing_service.domain.pricing import TokenUsage
from billing_service.storage.budget_store import BudgetStore
from tests.ledger.books import assert_books_balance, money
from tests.ledger.conftest import FLAT, INCLUDED, TOKENS
from tests.support.clock import FakeClock

TENANT = "acme"
DAY_END = datetime(2026, 1, 1, 23, 59, 59, tzinfo=UTC)


@pytest.fixture
async def budgets(core: BillingCore, engine: AsyncEngine, clock: FakeClock) -> BudgetCore:
    await core.create_tenant(
        CreateTenant("create", TENANT, 10_000_000, payment_method_on_file=True)
    )
    return BudgetCore(BudgetStore(engine), clock, PageTokens.random())


async def set_budget(
    budgets: BudgetCore,
    scope_id: str,
    limit: int,
    period: BudgetPeriod = BudgetPeriod.DAY,
    scope: BudgetScope = BudgetScope.USER,
    request_id: str = "",
) -> None:
    request_id = request_id or f"budget-{scope}-{scope_id}-{limit}-{period}"
    await budgets.set_budget(SetBudget(request_id, TENANT, scope, scope_id, limit, period))


def reserve(
    request_id: str, amount: int, user: str = "alice", key: str = "", model: str = TOKENS
) -> Reserve:
    return Reserve(request_id, TENANT, user, model, amount_micros=amount, api_key_id=key)


def output_costing(micros: int) -> TokenUsage:
    """TOKENS charges 15 micros per output token."""
    assert micros % 15 == 0
    return TokenUsage(0, 0, micros // 15)


async def test_a_hold_fits_in_the_budget_or_is_denied_with_its_reset_time(
    core: BillingCore, budgets: BudgetCore, engine: AsyncEngine
) -> None:
    await set_budget(budgets, "alice", 1_000_000)
    first = await core.reserve(reserve("r1", 600_000))
    assert first.decision.allowed
    [usage] = first.decision.budgets
    assert (usage.held_micros, usage.remaining_micros) == (600_000, 400_000)

    denied = await core.reserve(reserve("r2", 400_001))
    decision = denied.decision
    assert (decision.allowed, decision.reason) == (False, DenialReason.USER_BUDGET_EXHAUSTED)
    assert decision.exhausted_budget is not None
    assert decision.exhausted_budget.reset_time == datetime(2026, 1, 2, tzinfo=UTC)
    assert decision.exhausted_budget.remaining_micros == 400_000
    assert "resets at 2026-01-02T00:00:00Z" in decision.message
    # The tenant had room: only the budget refused, and the tenant's hold was given back.
    assert decision.available_micros == 10_000_000 - 600_000
    assert await money(engine, TENANT) == (0, 600_000)
    assert await core.reserve(reserve("r2", 400_001)) == denied

    # Another user has no budget; the budget's remaining fits exactly.
    assert (await core.reserve(reserve("r3", 400_001, user="bob"))).decision.allowed
    assert (await core.reserve(reserve("r4", 400_000))).decision.allowed
    assert (await budgets.get_budget(TENANT, BudgetScope.USER, "alice")).remaining_micros == 0
    await assert_books_balance(engine)


async def test_the_api_key_budget_applies_beside_the_users(
    core: BillingCore, budgets: BudgetCore
) -> None:
    await set_budget(budgets, "alice", 1_000_000)
    await set_budget(budgets, "key-1", 500_000, BudgetPeriod.MONTH, BudgetScope.API_KEY)
    granted = await core.reserve(reserve("r1", 300_000, key="key-1"))
    assert [u.remaining_micros for u in granted.decision.budgets] == [700_000, 200_000]
    assert granted.hold is not None
    assert granted.hold.api_key_id == "key-1"
    denied = (await core.reserve(reserve("r2", 300_000, user="bob", key="key-1"))).decision
    assert denied.reason is DenialReason.API_KEY_BUDGET_EXHAUSTED
    assert denied.exhausted_budget is not None
    assert denied.exhausted_budget.reset_time == datetime(2026, 2, 1, tzinfo=UTC)
    # Without the key, only the user's budget applies.
    assert (await core.reserve(reserve("r3", 300_000, user="bob"))).decision.allowed


@pytest.mark.parametrize(
    ("user", "key", "applied"),
    [
        ("alice", "", [("alice", 1_000_000)]),
        ("bob", "", []),
        ("bob", "key-1", [("key-1", 500_000)]),
        ("alice", "key-1", [("alice", 1_000_000), ("key-1", 500_000)]),
        # Another tenant's budgets for the same user and key never apply.
        ("carol", "key-2", []),
    ],
)
async def test_a_reservation_takes_from_exactly_the_budgets_of_its_user_and_key(
    core: BillingCore,
    budgets: BudgetCore,
    engine: AsyncEngine,
    user: str,
    key: str,
    applied: list[tuple[str, int]],
) -> None:
    await set_budget(budgets, "alice", 1_000_000)
    await set_budget(budgets, "key-1", 500_000, BudgetPeriod.MONTH, BudgetScope.API_KEY)
    await core.create_tenant(CreateTenant("create-other", "other", 10_000_000))
    for scope, scope_id in ((BudgetScope.USER, "carol"), (BudgetScope.API_KEY, "key-2")):
        await budgets.set_budget(
            SetBudget(f"other-{scope_id}", "other", scope, scope_id, 1, BudgetPeriod.DAY)
        )
    granted = await core.reserve(reserve("r1", 300_000, user=user, key=key))
    assert granted.hold is not None
    taken = [(u.budget.scope_id, u.budget.limit_micros) for u in granted.decision.budgets]
    assert taken == applied
    assert [(u.budget.scope_id, u.held_micros) for u in granted.hold.budgets] == [
        (scope_id, 300_000) for scope_id, _ in applied
    ]
    await assert_books_balance(engine)


async def test_commit_release_expiry_and_refund_move_the_budget_like_the_tenant(
    core: BillingCore, budgets: BudgetCore, clock: FakeClock, engine: AsyncEngine
) -> None:
    await set_budget(budgets, "alice", 1_000_000)
    committed = (await core.reserve(reserve("r1", 300_000))).hold
    released = (await core.reserve(reserve("r2", 200_000))).hold
    expiring = (await core.reserve(reserve("r3", 100_000))).hold
    assert committed is not None
    assert released is not None
    assert expiring is not None
    await core.commit(Commit("c1", committed.hold_id, output_costing(150_000)))
    await core.refund(Refund("f1", committed.hold_id, refund_all=True))
    await core.release(Release("f2", released.hold_id))
    usage = await budgets.get_budget(TENANT, BudgetScope.USER, "alice")
    assert (usage.spent_micros, usage.held_micros) == (0, 100_000)
    clock.advance(minutes=6)
    assert await core.release_expired() == 1
    usage = await budgets.get_budget(TENANT, BudgetScope.USER, "alice")
    assert (usage.spent_micros, usage.held_micros, usage.remaining_micros) == (0, 0, 1_000_000)
    await assert_books_balance(engine)


async def test_a_commit_above_its_hold_is_charged_only_up_to_the_budget(
    core: BillingCore, budgets: BudgetCore, engine: AsyncEngine
) -> None:
    await set_budget(budgets, "alice", 1_000_000)
    hold = (await core.reserve(reserve("r1", 600_000))).hold
    assert hold is not None
    outcome = await core.commit(Commit("c1", hold.hold_id, output_costing(1_500_000)))
    # The tenant had $9.4 of room; the budget only 400,000 beyond the hold.
    assert (outcome.record.charged_micros, outcome.record.uncollected_micros) == (
        1_000_000,
        500_000,
    )
    usage = await budgets.get_budget(TENANT, BudgetScope.USER, "alice")
    assert (usage.spent_micros, usage.remaining_micros) == (1_000_000, 0)
    assert await money(engine, TENANT) == (-1_000_000, 0)
    await assert_books_balance(engine)


async def test_spend_belongs_to_the_period_of_its_hold_and_the_budget_resets_at_utc_midnight(
    core: BillingCore, budgets: BudgetCore, clock: FakeClock, engine: AsyncEngine
) -> None:
    clock.now = DAY_END
    await set_budget(budgets, "alice", 1_000_000)
    late = (await core.reserve(reserve("r1", 900_000))).hold
    assert late is not None
    assert (await core.reserve(reserve("r2", 200_000))).decision.reason is (
        DenialReason.USER_BUDGET_EXHAUSTED
    )
    clock.advance(seconds=1)  # 2026-01-02 00:00:00 UTC: a new day
    fresh = await core.reserve(reserve("r3", 1_000_000))
    assert fresh.decision.allowed
    [usage] = fresh.decision.budgets
    assert usage.period_start == datetime(2026, 1, 2, tzinfo=UTC)
    assert usage.remaining_micros == 0
    # Committed after midnight, the late call still counts in the day its hold was taken.
    await core.commit(Commit("c1", late.hold_id, output_costing(450_000)))
    today = await budgets.get_budget(TENANT, BudgetScope.USER, "alice")
    assert (today.spent_micros, today.held_micros) == (0, 1_000_000)
    clock.now = DAY_END - timedelta(seconds=1)
    yesterday = await budgets.get_budget(TENANT, BudgetScope.USER, "alice")
    assert (yesterday.spent_micros, yesterday.held_micros) == (450_000, 0)
    await assert_books_balance(engine)


async def test_included_models_consume_no_budget_and_check_access_advises(
    core: BillingCore, budgets: BudgetCore
) -> None:
    await set_budget(budgets, "alice", 250_000)
    included = await core.reserve(reserve("r1", 1, model=INCLUDED))
    assert included.decision.allowed
    assert included.decision.budgets[0].remaining_micros == 250_000
    advice = await core.check_access(CheckAccess(TENANT, FLAT, user_id="alice"))
    assert (advice.allowed, advice.budgets[0].remaining_micros) == (True, 250_000)
    assert (await core.reserve(reserve("r2", 250_000, model=FLAT))).decision.allowed
    advice = await core.check_access(CheckAccess(TENANT, FLAT, user_id="alice"))
    assert advice.reason is DenialReason.USER_BUDGET_EXHAUSTED
    # Advice only: nothing was held by asking.
    assert (await core.check_access(CheckAccess(TENANT, FLAT, user_id="bob"))).allowed


async def test_a_removed_budget_keeps_its_holds_and_a_new_one_counts_the_period_spend(
    core: BillingCore, budgets: BudgetCore, engine: AsyncEngine
) -> None:
    await set_budget(budgets, "alice", 1_000_000)
    hold = (await core.reserve(reserve("r1", 700_000))).hold
    assert hold is not None
    removed = await budgets.delete_budget(DeleteBudget("d1", TENANT, BudgetScope.USER, "alice"))
    assert removed.held_micros == 700_000
    assert (await core.reserve(reserve("r2", 700_000))).decision.allowed  # no budget now
    await core.commit(Commit("c1", hold.hold_id, output_costing(600_000)))
    await set_budget(budgets, "alice", 1_000_000, request_id="set-again")
    usage = await budgets.get_budget(TENANT, BudgetScope.USER, "alice")
    # r2 was taken while no budget applied: only r1's charge counts.
    assert (usage.spent_micros, usage.held_micros) == (600_000, 0)
    assert (await core.reserve(reserve("r3", 400_001))).decision.reason is (
        DenialReason.USER_BUDGET_EXHAUSTED
    )
    await assert_books_balance(engine)
