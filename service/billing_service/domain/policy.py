"""Who may use what: the access decision and the words that explain a denial."""

from __future__ import annotations

from dataclasses import dataclass, replace

from billing_service.domain.admission import budget_denial_reason, budget_refusal, tenant_refusal
from billing_service.domain.budgets import BudgetUsage, exhausted_message
from billing_service.domain.model import Account, DenialReason
from billing_service.domain.money import format_micros
from billing_service.domain.payments import BILLING_STATUS_MESSAGES, BillingStatus
from billing_service.domain.pricing import ModelBilling, ModelPrice


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: DenialReason | None
    message: str
    available_micros: int
    billing: ModelBilling | None
    required_micros: int
    # Every budget that applies, as of the decision (after the hold when one was granted).
    budgets: tuple[BudgetUsage, ...] = ()
    # The budget that denied the query, for USER/API_KEY_BUDGET_EXHAUSTED.
    exhausted_budget: BudgetUsage | None = None


def decide(
    account: Account, model: str, price: ModelPrice | None, required_micros: int
) -> Decision:
    """Whether `account` may run a query on `model` that needs a hold of `required_micros`.

    This is advice on one snapshot. For a hold, the database statement that takes it applies the
    same rule (domain.admission, compiled into its SQL) atomically; this function then only
    explains a refusal.
    """
    available = account.available_micros
    if price is None:
        return denial(DenialReason.MODEL_NOT_OFFERED, model, available, None, 0)
    metered = price.billing is ModelBilling.METERED
    refusal = tenant_refusal(account, metered, required_micros)
    if refusal is None:
        return Decision(True, None, "", available, price.billing, required_micros)
    return denial(refusal.reason, model, available, price.billing, required_micros)


def denial(
    reason: DenialReason,
    model: str,
    available_micros: int,
    billing: ModelBilling | None,
    required_micros: int,
) -> Decision:
    return Decision(
        allowed=False,
        reason=reason,
        message=denial_message(reason, model, available_micros, required_micros),
        available_micros=available_micros,
        billing=billing,
        required_micros=required_micros,
    )


def denial_message(
    reason: DenialReason, model: str, available_micros: int, required_micros: int
) -> str:
    match reason:
        case DenialReason.MODEL_NOT_OFFERED:
            return f"The model {model!r} is not offered."
        case DenialReason.ACCOUNT_SUSPENDED:
            return "This account is suspended. Contact support to restore access."
        case DenialReason.PAYMENT_METHOD_REQUIRED:
            return f"Add a payment method to use {model}."
        case DenialReason.CREDIT_LIMIT_REACHED:
            return (
                f"Credit limit reached: this query needs {format_micros(required_micros)}, "
                f"{format_micros(max(0, available_micros))} is available. "
                "Top up or wait for pending charges to settle."
            )
        case DenialReason.TOP_UP_LIMIT_REACHED:
            return (
                f"Monthly limit on automatic card top-ups reached: this query needs "
                f"{format_micros(required_micros)}, {format_micros(max(0, available_micros))} "
                "is available. A billing admin can top up now or raise the monthly limit."
            )
        case DenialReason.PAYMENT_FAILED:
            return f"{BILLING_STATUS_MESSAGES[BillingStatus.PAYMENT_FAILED]} ({model})"
        case DenialReason.PAYMENT_ACTION_REQUIRED:
            return f"{BILLING_STATUS_MESSAGES[BillingStatus.ACTION_REQUIRED]} ({model})"
        case DenialReason.PAYMENT_DISPUTED:
            return f"{BILLING_STATUS_MESSAGES[BillingStatus.DISPUTED]} ({model})"
        case DenialReason.USER_BUDGET_EXHAUSTED | DenialReason.API_KEY_BUDGET_EXHAUSTED:
            return f"A budget does not leave room for this query on {model}."


def explain_refusal(
    account: Account, model: str, price: ModelPrice, required_micros: int
) -> Decision:
    """Why the database refused a hold, from the account read under its row lock right after
    the refusal (room found in that read is taken instead, so a credit denial reports an
    availability below what the query needs).

    The atomic statement is the authority: should it refuse a hold this policy allows, the
    refusal still stands and is reported as lack of credit.
    """
    decision = decide(account, model, price, required_micros)
    if not decision.allowed:
        return decision
    reason = (
        DenialReason.CREDIT_LIMIT_REACHED
        if account.payment_method_on_file
        else DenialReason.PAYMENT_METHOD_REQUIRED
    )
    return denial(reason, model, account.available_micros, price.billing, required_micros)


def within_budgets(decision: Decision, usages: tuple[BudgetUsage, ...]) -> Decision:
    """`decision` with the budgets that apply: a metered query allowed by the tenant's credit is
    denied by the first budget it does not fit in. Included models consume no budget."""
    decision = replace(decision, budgets=usages)
    if not decision.allowed or decision.billing is not ModelBilling.METERED:
        return decision
    refusal = budget_refusal(usages, decision.required_micros)
    if refusal is None or refusal.budget is None:
        return decision
    return budget_denial(decision, refusal.budget)


def budget_denial(decision: Decision, exhausted: BudgetUsage) -> Decision:
    return replace(
        decision,
        allowed=False,
        reason=budget_denial_reason(exhausted),
        message=exhausted_message(exhausted, decision.required_micros),
        exhausted_budget=exhausted,
    )
