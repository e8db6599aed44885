"""The admission rule, written once: may a hold be granted, and if not, which reason denies it.

A hold of `amount_micros` on a model is granted when every check below passes, in this order;
the first that fails gives the denial reason:

1. the tenant is active (every model);
2. the tenant's billing is in good standing (metered models);
3. the hold fits in the tenant's available credit (metered models);
4. the hold fits in every budget that applies, user before API key (metered models).

Each check is a rule (domain.rules) over the tenant's row or one budget period's row, so the
same definition is evaluated here (policy.decide, the general transaction) and compiled by
storage.credit_sql into every statement that takes a hold: the general transaction's
conditional UPDATE, the per-call and the batched PostgreSQL statements, and the pgbench script.
tests/ledger/test_admission_agrees.py checks on random accounts, budgets and amounts that every
path decides as `first_refusal` does.
"""

from __future__ import annotations

from dataclasses import dataclass

from billing_service.domain.budgets import (
    BUDGET_FITS,
    BUDGETS,
    DENIAL_REASONS,
    HOLD_AMOUNT,
    BudgetUsage,
    in_scope_order,
)
from billing_service.domain.model import (
    AVAILABLE_CREDIT,
    PAYMENT_DENIALS,
    TENANTS,
    Account,
    DenialReason,
    TenantStatus,
)
from billing_service.domain.payments import BillingStatus
from billing_service.domain.rules import (
    AllOf,
    Case,
    Column,
    Compare,
    Const,
    Expr,
    Not,
    evaluate,
)


@dataclass(frozen=True, slots=True)
class Check:
    """One condition of a grant, and the reason (a DenialReason value) when it fails."""

    passes: Expr
    reason: Expr
    # Included models move no money: only the checks with False apply to them.
    metered_only: bool


_STATUS = Column(TENANTS, "status")
_BILLING_STATUS = Column(TENANTS, "billing_status")

TENANT_ACTIVE = Check(
    Compare("==", _STATUS, Const(TenantStatus.ACTIVE.value)),
    Const(DenialReason.ACCOUNT_SUSPENDED.value),
    metered_only=False,
)
GOOD_STANDING = Check(
    Compare("==", _BILLING_STATUS, Const(BillingStatus.GOOD_STANDING.value)),
    Case(
        tuple(
            (Compare("==", _BILLING_STATUS, Const(status.value)), Const(reason.value))
            for status, reason in PAYMENT_DENIALS.items()
        ),
        Const(DenialReason.PAYMENT_FAILED.value),
    ),
    metered_only=True,
)
CREDIT_FITS = Check(
    Compare(">=", AVAILABLE_CREDIT, HOLD_AMOUNT),
    Case(
        (
            (
                Column(TENANTS, "payment_method_on_file"),
                Const(DenialReason.CREDIT_LIMIT_REACHED.value),
            ),
        ),
        Const(DenialReason.PAYMENT_METHOD_REQUIRED.value),
    ),
    metered_only=True,
)
# The checks on the tenant's row, in the order their reasons are decided.
TENANT_CHECKS = (TENANT_ACTIVE, GOOD_STANDING, CREDIT_FITS)

# The check on each budget that applies (after the tenant's), in SCOPE_ORDER.
BUDGET_CHECK = Check(
    BUDGET_FITS,
    Case(
        tuple(
            (Compare("==", Column(BUDGETS, "scope"), Const(scope.value)), Const(reason.value))
            for scope, reason in DENIAL_REASONS.items()
        ),
        Const(DenialReason.API_KEY_BUDGET_EXHAUSTED.value),
    ),
    metered_only=True,
)


# The value of a refusal rule when every check passes.
NO_REFUSAL = ""


def tenant_checks(metered: bool) -> tuple[Check, ...]:
    return tuple(check for check in TENANT_CHECKS if metered or not check.metered_only)


def tenant_admits(metered: bool) -> Expr:
    """The tenant's part of a grant as one condition (a statement's WHERE)."""
    return AllOf(tuple(check.passes for check in tenant_checks(metered)))


def refusal_rule(checks: tuple[Check, ...]) -> Expr:
    """The reason of the first check that fails, or NO_REFUSAL."""
    return Case(tuple((Not(check.passes), check.reason) for check in checks), Const(NO_REFUSAL))


TENANT_REFUSAL = {metered: refusal_rule(tenant_checks(metered)) for metered in (True, False)}
BUDGET_REFUSAL = refusal_rule((BUDGET_CHECK,))


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: DenialReason
    # The budget that refused, for USER/API_KEY_BUDGET_EXHAUSTED.
    budget: BudgetUsage | None = None


def tenant_refusal(account: Account, metered: bool, amount_micros: int) -> Refusal | None:
    """The first tenant check a hold of `amount_micros` fails, or None."""
    params = {HOLD_AMOUNT.name: amount_micros}
    reason = evaluate(TENANT_REFUSAL[metered], {TENANTS: account}, params)
    return None if reason == NO_REFUSAL else Refusal(DenialReason(reason))


def budget_refusal(usages: tuple[BudgetUsage, ...], amount_micros: int) -> Refusal | None:
    """The first budget (in SCOPE_ORDER) a metered hold of `amount_micros` does not fit in."""
    params = {HOLD_AMOUNT.name: amount_micros}
    for usage in in_scope_order(usages):
        reason = evaluate(BUDGET_REFUSAL, {BUDGETS: usage}, params)
        if reason != NO_REFUSAL:
            return Refusal(DenialReason(reason), usage)
    return None


def budget_denial_reason(exhausted: BudgetUsage) -> DenialReason:
    """The reason a budget gives when it refuses (the reason of its scope)."""
    return DenialReason(evaluate(BUDGET_CHECK.reason, {BUDGETS: exhausted}))


def first_refusal(
    account: Account, metered: bool, amount_micros: int, usages: tuple[BudgetUsage, ...] = ()
) -> Refusal | None:
    """Why a hold of `amount_micros` is denied on this snapshot, or None when it is granted."""
    refusal = tenant_refusal(account, metered, amount_micros)
    if refusal is not None or not metered:
        return refusal
    return budget_refusal(usages, amount_micros)
