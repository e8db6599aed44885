"""Card payments: billing status, top-up charges and their states, cents <-> micros.

Stripe counts money in cents, the ledger in micros (1 cent = 10,000 micros). Every conversion
is explicit about its rounding; no float is ever involved.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from billing_service.domain.errors import InvalidArgument
from billing_service.domain.money import AMOUNT_MICROS_MAX

MICROS_PER_CENT = 10_000
CHARGE_ID_LENGTH = 36  # "chg_" and 32 hex digits
# Stripe's smallest USD charge: $0.50.
TOP_UP_MICROS_MIN = 500_000
# Without a configured ceiling, automatic top-ups may take this many top-up amounts a month.
MONTHLY_LIMIT_TOP_UPS_DEFAULT = 10


class BillingStatus(StrEnum):
    GOOD_STANDING = "good_standing"
    PAYMENT_FAILED = "payment_failed"
    ACTION_REQUIRED = "action_required"
    DISPUTED = "disputed"


BILLING_STATUS_MESSAGES = {
    BillingStatus.GOOD_STANDING: "",
    BillingStatus.PAYMENT_FAILED: (
        "The last card charge was declined. Update the card or top up now to use metered models."
    ),
    BillingStatus.ACTION_REQUIRED: (
        "The bank asks the card holder to authenticate the last charge. Complete it on the "
        "billing page to use metered models."
    ),
    BillingStatus.DISPUTED: (
        "A card payment is disputed. Metered models are suspended until it is resolved; "
        "contact support."
    ),
}


class ChargeTrigger(StrEnum):
    AUTOMATIC = "automatic"
    ON_DEMAND = "on_demand"
    MANUAL = "manual"


# The charges the monthly ceiling counts: those no human asked for at the moment they were made.
AUTOMATIC_TRIGGERS = (ChargeTrigger.AUTOMATIC, ChargeTrigger.ON_DEMAND)


class ChargeStatus(StrEnum):
    # Decided; the worker is sending it, or learning from Stripe what became of it.
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    # Stripe declined it (or it was never sent): nothing was taken.
    FAILED = "failed"
    ACTION_REQUIRED = "action_required"
    REFUNDED = "refunded"
    # It may have been charged, and what Stripe did could not be learned automatically: an
    # operator resolves it (AdminService.ResolveCharge).
    UNRESOLVED = "unresolved"


# The statuses a charge may be in before it moves to the key's status. Success may follow a
# failure or an authentication (the same PaymentIntent confirmed again by its holder);
# nothing ever moves a succeeded or refunded charge back, and only Stripe's own answer (never
# a guess) moves a charge out of PENDING or UNRESOLVED.
ALLOWED_BEFORE: dict[ChargeStatus, frozenset[ChargeStatus]] = {
    ChargeStatus.SUCCEEDED: frozenset(
        {
            ChargeStatus.PENDING,
            ChargeStatus.UNRESOLVED,
            ChargeStatus.FAILED,
            ChargeStatus.ACTION_REQUIRED,
        }
    ),
    ChargeStatus.FAILED: frozenset(
        {ChargeStatus.PENDING, ChargeStatus.UNRESOLVED, ChargeStatus.ACTION_REQUIRED}
    ),
    ChargeStatus.ACTION_REQUIRED: frozenset({ChargeStatus.PENDING, ChargeStatus.UNRESOLVED}),
    ChargeStatus.REFUNDED: frozenset({ChargeStatus.SUCCEEDED, ChargeStatus.REFUNDED}),
    ChargeStatus.UNRESOLVED: frozenset({ChargeStatus.PENDING}),
}

# The charges that have taken money, or may still: a charge in flight, one whose outcome is
# unknown, one waiting for its holder's authentication. Each counts against the monthly
# ceiling of the month it was made in, whenever (and whether) it succeeds.
MAY_TAKE_MONEY = frozenset(
    {
        ChargeStatus.PENDING,
        ChargeStatus.UNRESOLVED,
        ChargeStatus.ACTION_REQUIRED,
        ChargeStatus.SUCCEEDED,
        ChargeStatus.REFUNDED,
    }
)
# The charges that took money (their TOP_UP credit is in the ledger).
TOOK_MONEY = frozenset({ChargeStatus.SUCCEEDED, ChargeStatus.REFUNDED})
# The charges the service still owes an outcome (ACTION_REQUIRED waits for a person instead).
OPEN_STATUSES = frozenset({ChargeStatus.PENDING, ChargeStatus.UNRESOLVED})

# What a finished charge does to the tenant's billing status.
STATUS_AFTER_CHARGE = {
    ChargeStatus.FAILED: BillingStatus.PAYMENT_FAILED,
    ChargeStatus.ACTION_REQUIRED: BillingStatus.ACTION_REQUIRED,
}


def clears_on_success(status: BillingStatus) -> bool:
    """A successful charge or a new card clears a payment problem; only an operator clears a
    dispute."""
    return status in (BillingStatus.PAYMENT_FAILED, BillingStatus.ACTION_REQUIRED)


def micros_to_cents(amount_micros: int) -> int:
    """Exact: a charge amount is always a whole number of cents (checked where it is decided)."""
    cents, rest = divmod(amount_micros, MICROS_PER_CENT)
    if rest:
        raise ValueError(f"{amount_micros} micros is not a whole number of cents")
    return cents


def cents_to_micros(amount_cents: int) -> int:
    return amount_cents * MICROS_PER_CENT


def round_up_to_cents(amount_micros: int) -> int:
    """A top-up that must cover `amount_micros` charges the next whole cent (never less)."""
    return -(-amount_micros // MICROS_PER_CENT) * MICROS_PER_CENT


def check_top_up_amount(field: str, amount_micros: int) -> None:
    if not TOP_UP_MICROS_MIN <= amount_micros <= AMOUNT_MICROS_MAX:
        raise InvalidArgument(
            field, f"must be {TOP_UP_MICROS_MIN} to {AMOUNT_MICROS_MAX} micros ($0.50 or more)"
        )
    if amount_micros % MICROS_PER_CENT:
        raise InvalidArgument(field, "must be a whole number of cents (a multiple of 10000)")


def check_charge_id(field: str, charge_id: str) -> None:
    if (
        len(charge_id) != CHARGE_ID_LENGTH
        or not charge_id.startswith("chg_")
        or any(c not in "0123456789abcdef" for c in charge_id[4:])
    ):
        raise InvalidArgument(field, "must be 'chg_' followed by 32 lowercase hex digits")


def check_threshold(field: str, amount_micros: int) -> None:
    if not 0 <= amount_micros <= AMOUNT_MICROS_MAX:
        raise InvalidArgument(field, f"must be 0 to {AMOUNT_MICROS_MAX} micros")


def check_monthly_limit(field: str, amount_micros: int) -> None:
    if not 0 <= amount_micros <= AMOUNT_MICROS_MAX:
        raise InvalidArgument(field, f"must be 0 to {AMOUNT_MICROS_MAX} micros")


def default_monthly_limit(configured_micros: int | None, top_up_micros: int) -> int:
    """The server's ceiling: the configured one, else ten top-up amounts of the tenant."""
    if configured_micros is not None:
        return configured_micros
    return min(MONTHLY_LIMIT_TOP_UPS_DEFAULT * top_up_micros, AMOUNT_MICROS_MAX)


def month_start(now: datetime) -> datetime:
    """The ceiling's period: the calendar month, in UTC."""
    return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def on_demand_amount(top_up_micros: int, shortfall_micros: int) -> int:
    """An on-demand top-up charges the usual top-up, or more when one query needs more."""
    return max(top_up_micros, round_up_to_cents(shortfall_micros), TOP_UP_MICROS_MIN)


@dataclass(frozen=True, slots=True)
class AutoTopUp:
    enabled: bool
    threshold_micros: int
    amount_micros: int
    # The most automatic charges may take per calendar month (UTC). None only in the server's
    # defaults, where it means MONTHLY_LIMIT_TOP_UPS_DEFAULT top-up amounts.
    monthly_limit_micros: int | None = None


@dataclass(frozen=True, slots=True)
class Card:
    payment_method_id: str
    brand: str
    last4: str
    saved_at: datetime | None


@dataclass(frozen=True, slots=True)
class BillingProfile:
    tenant_id: str
    billing_status: BillingStatus
    stripe_customer_id: str | None
    card: Card | None
    auto_top_up: AutoTopUp
    pending_charge: Charge | None
    # Successful automatic and on-demand charges made this calendar month (UTC).
    automatic_top_ups_this_month_micros: int = 0
    # When the newest fact about the card happened by our own data (the creation of the
    # SetupIntent that saved it, or its removal); None before any.
    card_fact_at: datetime | None = None

    @property
    def billing_status_message(self) -> str:
        return BILLING_STATUS_MESSAGES[self.billing_status]


@dataclass(frozen=True, slots=True)
class Charge:
    charge_id: str
    tenant_id: str
    amount_micros: int
    trigger: ChargeTrigger
    status: ChargeStatus
    payment_intent_id: str | None
    failure_message: str | None
    refunded_micros: int
    created_at: datetime
    updated_at: datetime
    request_id: str | None = None
    request_fingerprint: str | None = None
    # What Stripe is asked, fixed when the charge is decided: every attempt sends exactly
    # these (with the key `charge-<charge_id>`), whatever happens to the tenant's card since.
    stripe_customer_id: str | None = None
    payment_method_id: str | None = None
    # None only for charges decided before it was kept: the server's currency.
    currency: str | None = None
    # When a request for it may first have reached Stripe; None: never sent.
    sent_at: datetime | None = None
    attempts: int = 0


class TopUpAttempt(StrEnum):
    """How an on-demand top-up ended, as the reservation that asked for it sees it."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    # No charge could be made: no card, a payment problem, auto top-up off.
    NOT_ELIGIBLE = "not_eligible"
    # A charge would have been made but automatic charges reached the monthly ceiling.
    LIMIT_REACHED = "limit_reached"


class PaymentOutcome(StrEnum):
    """What Stripe answered to a PaymentIntent create."""

    SUCCEEDED = "succeeded"
    DECLINED = "declined"
    REQUIRES_ACTION = "requires_action"


OUTCOME_STATUS = {
    PaymentOutcome.SUCCEEDED: ChargeStatus.SUCCEEDED,
    PaymentOutcome.DECLINED: ChargeStatus.FAILED,
    PaymentOutcome.REQUIRES_ACTION: ChargeStatus.ACTION_REQUIRED,
}
