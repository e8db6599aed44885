"""Budgets inside a tenant: a spending limit per UTC period on one end user or one API key.

Rules, each decided here once:
- Periods are UTC: a day starts at 00:00, a week on Monday 00:00, a month on the 1st at 00:00;
  a budget without a period has one period that never ends (its start is EPOCH).
- Fit: a hold is granted only if `spent + held + amount <= limit` in every budget that applies,
  and it fits in the tenant's available credit. Only metered models consume budgets.
- A call's spend belongs to the period in which its hold was taken: the hold records the
  period starts it took from, and its commit, release, expiry or refund moves exactly those.
- A commit above its hold is charged at most `hold + room`, where room is the least of the
  tenant's available credit and every applicable budget's remaining; the rest is uncollected,
  like the tenant's rule. So no budget is ever overshot (bound: zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from billing_service.domain.commands import check_id, check_money
from billing_service.domain.errors import InvalidArgument
from billing_service.domain.model import DenialReason
from billing_service.domain.money import AMOUNT_MICROS_MAX, format_micros
from billing_service.domain.rules import Case, Column, Compare, Const, Expr, Param, Sub, evaluate

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class BudgetScope(StrEnum):
    USER = "user"
    API_KEY = "api_key"


class BudgetPeriod(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    NONE = "none"


DENIAL_REASONS = {
    BudgetScope.USER: DenialReason.USER_BUDGET_EXHAUSTED,
    BudgetScope.API_KEY: DenialReason.API_KEY_BUDGET_EXHAUSTED,
}
# The order in which the budgets of a call are checked and locked.
SCOPE_ORDER = (BudgetScope.USER, BudgetScope.API_KEY)

# Rules (domain.rules) over a BudgetUsage: the domain evaluates them, storage compiles them
# into the statements that take holds.
BUDGETS = "budgets"
# A budget's rank in SCOPE_ORDER.
SCOPE_RANK: Expr = Case(
    tuple(
        (Compare("==", Column(BUDGETS, "scope"), Const(scope.value)), Const(rank))
        for rank, scope in enumerate(SCOPE_ORDER)
    ),
    Const(len(SCOPE_ORDER)),
)
# The fit of a hold in one budget's period.
HOLD_AMOUNT = Param("amount_micros")
BUDGET_REMAINING: Expr = Sub(
    Sub(Column(BUDGETS, "limit_micros"), Column(BUDGETS, "spent_micros")),
    Column(BUDGETS, "held_micros"),
)
BUDGET_FITS: Expr = Compare("<=", HOLD_AMOUNT, BUDGET_REMAINING)


def period_start(period: BudgetPeriod, now: datetime) -> datetime:
    """The UTC start of the period that contains `now`."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    match period:
        case BudgetPeriod.DAY:
            return day
        case BudgetPeriod.WEEK:
            return day - timedelta(days=day.weekday())
        case BudgetPeriod.MONTH:
            return day.replace(day=1)
        case BudgetPeriod.NONE:
            return EPOCH


def reset_time(period: BudgetPeriod, start: datetime) -> datetime | None:
    """When the period that began at `start` ends; None for a budget without a period."""
    match period:
        case BudgetPeriod.DAY:
            return start + timedelta(days=1)
        case BudgetPeriod.WEEK:
            return start + timedelta(days=7)
        case BudgetPeriod.MONTH:
            if start.month == 12:
                return start.replace(year=start.year + 1, month=1)
            return start.replace(month=start.month + 1)
        case BudgetPeriod.NONE:
            return None


@dataclass(frozen=True, slots=True)
class Budget:
    tenant_id: str
    scope: BudgetScope
    scope_id: str
    limit_micros: int
    period: BudgetPeriod


@dataclass(frozen=True, slots=True)
class BudgetUsage:
    """A budget and its use in one period, as of one read or decision."""

    budget: Budget
    period_start: datetime
    spent_micros: int = 0
    held_micros: int = 0

    @property
    def limit_micros(self) -> int:
        return self.budget.limit_micros

    @property
    def scope(self) -> BudgetScope:
        return self.budget.scope

    @property
    def remaining_micros(self) -> int:
        return int(evaluate(BUDGET_REMAINING, {BUDGETS: self}))

    @property
    def reset_time(self) -> datetime | None:
        return reset_time(self.budget.period, self.period_start)

    def fits(self, amount_micros: int) -> bool:
        return bool(evaluate(BUDGET_FITS, {BUDGETS: self}, {HOLD_AMOUNT.name: amount_micros}))

    def after_hold(self, amount_micros: int) -> BudgetUsage:
        return BudgetUsage(
            self.budget, self.period_start, self.spent_micros, self.held_micros + amount_micros
        )


def in_scope_order(usages: tuple[BudgetUsage, ...]) -> tuple[BudgetUsage, ...]:
    return tuple(sorted(usages, key=lambda usage: int(evaluate(SCOPE_RANK, {BUDGETS: usage}))))


def first_exhausted(usages: tuple[BudgetUsage, ...], amount_micros: int) -> BudgetUsage | None:
    """The first budget (user before API key) a hold of `amount_micros` does not fit in."""
    for usage in in_scope_order(usages):
        if not usage.fits(amount_micros):
            return usage
    return None


def exhausted_message(usage: BudgetUsage, required_micros: int) -> str:
    budget = usage.budget
    who = "user" if budget.scope is BudgetScope.USER else "API key"
    reset = usage.reset_time
    when = (
        "It does not reset."
        if reset is None
        else f"It resets at {reset.strftime('%Y-%m-%dT%H:%M:%SZ')}."
    )
    return (
        f"The {budget.period.value if budget.period is not BudgetPeriod.NONE else 'lifetime'} "
        f"budget of {who} {budget.scope_id!r} is exhausted: this query needs "
        f"{format_micros(required_micros)}, {format_micros(max(0, usage.remaining_micros))} "
        f"of {format_micros(budget.limit_micros)} remains. {when}"
    )


# Requests


@dataclass(frozen=True, slots=True)
class SetBudget:
    request_id: str
    tenant_id: str
    # None: unset in the request (invalid).
    scope: BudgetScope | None
    scope_id: str
    limit_micros: int
    period: BudgetPeriod | None


@dataclass(frozen=True, slots=True)
class DeleteBudget:
    request_id: str
    tenant_id: str
    scope: BudgetScope | None
    scope_id: str


def check_scope(field: str, scope: BudgetScope | None) -> BudgetScope:
    if scope is None:
        raise InvalidArgument(field, "is required (USER or API_KEY)")
    return scope


def validate_set_budget(command: SetBudget) -> Budget:
    """Checks a SetBudget request and returns the budget it sets."""
    check_id("request_id", command.request_id)
    check_id("budget.tenant_id", command.tenant_id)
    scope = check_scope("budget.scope", command.scope)
    check_id("budget.scope_id", command.scope_id)
    check_money("budget.limit_micros", command.limit_micros, 1, AMOUNT_MICROS_MAX)
    if command.period is None:
        raise InvalidArgument("budget.period", "is required (DAY, WEEK, MONTH or NONE)")
    return Budget(command.tenant_id, scope, command.scope_id, command.limit_micros, command.period)


def validate_budget_key(tenant_id: str, scope: BudgetScope | None, scope_id: str) -> BudgetScope:
    check_id("tenant_id", tenant_id)
    checked = check_scope("scope", scope)
    check_id("scope_id", scope_id)
    return checked


def validate_delete_budget(command: DeleteBudget) -> BudgetScope:
    check_id("request_id", command.request_id)
    return validate_budget_key(command.tenant_id, command.scope, command.scope_id)
