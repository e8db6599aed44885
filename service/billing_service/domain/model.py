"""The things the ledger is about: accounts (a tenant's money), holds, usage records."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING

from billing_service.domain.payments import BillingStatus
from billing_service.domain.pricing import ModelBilling, ModelPrice, TokenUsage
from billing_service.domain.rules import Add, Case, Column, Const, Expr, Sub, evaluate

if TYPE_CHECKING:
    from billing_service.domain.budgets import BudgetUsage


class TenantStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


# A tenant's credit, as rules (domain.rules) over its row: the domain evaluates them on an
# Account, storage compiles them into every statement that moves or checks credit.
TENANTS = "tenants"
# A credit limit is extended only to a tenant with a payment method on file.
EFFECTIVE_CREDIT_LIMIT: Expr = Case(
    ((Column(TENANTS, "payment_method_on_file"), Column(TENANTS, "credit_limit_micros")),),
    Const(0),
)
# The most a new hold may take. The exposure cap is `available >= 0`.
AVAILABLE_CREDIT: Expr = Sub(
    Add((Column(TENANTS, "balance_micros"), EFFECTIVE_CREDIT_LIMIT)),
    Column(TENANTS, "held_micros"),
)


@dataclass(frozen=True, slots=True)
class Account:
    """A tenant's settings and money as of one read.

    balance: prepaid credit minus spend (negative while spending on credit).
    held: the sum of open holds.
    """

    tenant_id: str
    status: TenantStatus
    credit_limit_micros: int
    payment_method_on_file: bool
    balance_micros: int = 0
    held_micros: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    billing_status: BillingStatus = BillingStatus.GOOD_STANDING

    @property
    def effective_credit_limit_micros(self) -> int:
        return int(evaluate(EFFECTIVE_CREDIT_LIMIT, {TENANTS: self}))

    @property
    def available_micros(self) -> int:
        return int(evaluate(AVAILABLE_CREDIT, {TENANTS: self}))

    @property
    def exposure_micros(self) -> int:
        """Open holds plus spend not covered by prepaid credit."""
        return max(0, self.held_micros - self.balance_micros)


class HoldStatus(StrEnum):
    OPEN = "open"
    COMMITTED = "committed"
    RELEASED = "released"
    EXPIRED = "expired"
    # A reservation that was refused: kept only so a retry replays the same answer.
    DENIED = "denied"


class DenialReason(StrEnum):
    PAYMENT_METHOD_REQUIRED = "payment_method_required"
    CREDIT_LIMIT_REACHED = "credit_limit_reached"
    ACCOUNT_SUSPENDED = "account_suspended"
    MODEL_NOT_OFFERED = "model_not_offered"
    PAYMENT_FAILED = "payment_failed"
    PAYMENT_ACTION_REQUIRED = "payment_action_required"
    PAYMENT_DISPUTED = "payment_disputed"
    TOP_UP_LIMIT_REACHED = "top_up_limit_reached"
    USER_BUDGET_EXHAUSTED = "user_budget_exhausted"
    API_KEY_BUDGET_EXHAUSTED = "api_key_budget_exhausted"


def lifted_by_top_up(reason: DenialReason | None) -> bool:
    """Whether more credit (a top-up) could turn a denial for this reason into a grant: only a
    lack of credit. A budget, the tenant's status or a payment problem denies whatever the
    balance."""
    return reason is DenialReason.CREDIT_LIMIT_REACHED


# A payment problem denies metered models with the reason of the same name.
PAYMENT_DENIALS = {
    BillingStatus.PAYMENT_FAILED: DenialReason.PAYMENT_FAILED,
    BillingStatus.ACTION_REQUIRED: DenialReason.PAYMENT_ACTION_REQUIRED,
    BillingStatus.DISPUTED: DenialReason.PAYMENT_DISPUTED,
}


@dataclass(frozen=True, slots=True)
class Hold:
    """One reservation: granted (open and later settled) or denied.

    It carries the price of its model as of the reservation, so a later change of the price
    table never changes what an open hold will cost.
    """

    hold_id: str
    request_id: str
    request_fingerprint: str
    tenant_id: str
    user_id: str
    model: str
    # None only for a reservation denied because the model is not offered.
    price: ModelPrice | None
    amount_micros: int
    status: HoldStatus
    created_at: datetime
    expires_at: datetime
    decision_available_micros: int
    denial_reason: DenialReason | None = None
    settled_at: datetime | None = None
    refunded_micros: int = 0
    # The API key or caller label of the call; "" when none was given.
    api_key_id: str = ""
    # The budgets that applied, as of the decision. For a granted hold: each one's use after
    # the hold, and the period it took from (its commit, release or expiry moves that period).
    budgets: tuple[BudgetUsage, ...] = ()
    # What extensions (ExtendHold) added to the amount granted; amount_micros includes it.
    extended_micros: int = 0
    # The expire time as granted, once an extension moved it; None while it never moved.
    granted_expires_at: datetime | None = None

    @property
    def metered(self) -> bool:
        return self.price is not None and self.price.billing is ModelBilling.METERED

    def as_granted(self) -> Hold:
        """The hold as ReserveCredit granted it, before any extension or settlement."""
        return replace(
            self,
            status=HoldStatus.OPEN,
            settled_at=None,
            refunded_micros=0,
            amount_micros=self.amount_micros - self.extended_micros,
            expires_at=self.granted_expires_at or self.expires_at,
            extended_micros=0,
            granted_expires_at=None,
        )


class PaymentSource(StrEnum):
    CREDIT = "credit"
    INCLUDED = "included"


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """What one committed model call used and cost. Its id is its reservation's id."""

    hold_id: str
    tenant_id: str
    user_id: str
    model: str
    usage: TokenUsage
    cost_micros: int
    charged_micros: int
    uncollected_micros: int
    held_micros: int
    payment_source: PaymentSource
    reserved_at: datetime
    committed_at: datetime
    request_id: str
    request_fingerprint: str


@dataclass(frozen=True, slots=True)
class Balance:
    """A tenant's money at one point of its ledger."""

    balance_micros: int
    held_micros: int
    effective_credit_limit_micros: int

    # As a row of AVAILABLE_CREDIT: the limit is already the effective one.
    payment_method_on_file = True

    @property
    def credit_limit_micros(self) -> int:
        return self.effective_credit_limit_micros

    @property
    def available_micros(self) -> int:
        return int(evaluate(AVAILABLE_CREDIT, {TENANTS: self}))

    @property
    def exposure_micros(self) -> int:
        return max(0, self.held_micros - self.balance_micros)

    @classmethod
    def of(cls, account: Account) -> Balance:
        return cls(
            account.balance_micros, account.held_micros, account.effective_credit_limit_micros
        )
