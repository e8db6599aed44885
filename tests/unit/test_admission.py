"""The admission rule (domain.admission): the order in which denial reasons are decided, on
every combination of tenant status, billing standing, payment method, credit and budgets."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from billing_service.domain.admission import first_refusal
from billing_service.domain.budgets import Budget, BudgetPeriod, BudgetScope, BudgetUsage
from billing_service.domain.model import PAYMENT_DENIALS, Account, DenialReason, TenantStatus
from billing_service.domain.payments import BillingStatus

_money = st.integers(0, 2_000)
accounts = st.builds(
    Account,
    tenant_id=st.just("t"),
    status=st.sampled_from(TenantStatus),
    credit_limit_micros=_money,
    payment_method_on_file=st.booleans(),
    balance_micros=st.integers(-1_000, 1_000),
    held_micros=_money,
    billing_status=st.sampled_from(BillingStatus),
)
usages = st.lists(
    st.builds(
        BudgetUsage,
        budget=st.builds(
            Budget,
            tenant_id=st.just("t"),
            scope=st.sampled_from(BudgetScope),
            scope_id=st.just("s"),
            limit_micros=st.integers(1, 2_000),
            period=st.just(BudgetPeriod.DAY),
        ),
        period_start=st.just(datetime(2026, 1, 1, tzinfo=UTC)),
        spent_micros=_money,
        held_micros=_money,
    ),
    max_size=2,
    unique_by=lambda usage: usage.budget.scope,
).map(tuple)


def reference(
    account: Account, metered: bool, amount: int, budgets: tuple[BudgetUsage, ...]
) -> DenialReason | None:
    """The rule written out by hand, check by check."""
    if account.status is TenantStatus.SUSPENDED:
        return DenialReason.ACCOUNT_SUSPENDED
    if not metered:
        return None
    if account.billing_status is not BillingStatus.GOOD_STANDING:
        return PAYMENT_DENIALS[account.billing_status]
    limit = account.credit_limit_micros if account.payment_method_on_file else 0
    if account.balance_micros + limit - account.held_micros < amount:
        if account.payment_method_on_file:
            return DenialReason.CREDIT_LIMIT_REACHED
        return DenialReason.PAYMENT_METHOD_REQUIRED
    for scope in (BudgetScope.USER, BudgetScope.API_KEY):
        for usage in budgets:
            remaining = usage.budget.limit_micros - usage.spent_micros - usage.held_micros
            if usage.budget.scope is scope and amount > remaining:
                return {
                    BudgetScope.USER: DenialReason.USER_BUDGET_EXHAUSTED,
                    BudgetScope.API_KEY: DenialReason.API_KEY_BUDGET_EXHAUSTED,
                }[scope]
    return None


@given(account=accounts, metered=st.booleans(), amount=st.integers(1, 3_000), budgets=usages)
def test_the_first_refusal_is_the_first_rule_broken_in_order(
    account: Account, metered: bool, amount: int, budgets: tuple[BudgetUsage, ...]
) -> None:
    refusal = first_refusal(account, metered, amount, budgets)
    assert (None if refusal is None else refusal.reason) == reference(
        account, metered, amount, budgets
    )
    if refusal is not None and refusal.budget is not None:
        assert refusal.budget.budget.scope.value in refusal.reason.value
