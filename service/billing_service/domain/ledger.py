"""Settlement rules: what a commit debits, what a refund may give back, which holds can settle.

The ledger itself (entries, balances) lives in storage; these functions decide the amounts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from billing_service.domain.errors import ErrorReason, FailedPrecondition, NotFound
from billing_service.domain.model import Hold, HoldStatus


class EntryKind(StrEnum):
    """Every change of money is one immutable ledger entry of one of these kinds."""

    GRANT = "grant"  # operator credit: balance +
    HOLD = "hold"  # held +
    RELEASE = "release"  # held - (released by a Refund before commit)
    EXPIRY = "expiry"  # held - (released at its expire time)
    DEBIT = "debit"  # held - the hold, balance - the charge (a commit)
    REFUND = "refund"  # balance + (part of a committed charge given back)
    TOP_UP = "top_up"  # balance + (a card charge succeeded; carries its charge id)
    TOP_UP_REVERSAL = "top_up_reversal"  # balance - (a card charge refunded or disputed)


@dataclass(frozen=True, slots=True)
class Settlement:
    charged_micros: int
    uncollected_micros: int


def settle(hold: Hold, cost_micros: int, available_micros: int) -> Settlement:
    """What a commit of `hold` at `cost_micros` debits.

    available_micros is the tenant's available credit just before the commit, with this hold
    still counted in it. Up to the hold is always charged: it was granted inside the cap. Above
    the hold, only what still fits under the credit limit is charged; the rest is recorded as
    uncollected, so a commit can never take a tenant past its cap.
    """
    if not hold.metered:
        return Settlement(charged_micros=0, uncollected_micros=0)
    chargeable = hold.amount_micros + max(0, available_micros)
    charged = min(cost_micros, chargeable)
    return Settlement(charged_micros=charged, uncollected_micros=cost_micros - charged)


def check_committable(hold: Hold | None, reservation_id: str, now: datetime) -> Hold:
    """Raises the error that explains why `hold` cannot be committed, if it cannot."""
    hold = require_reservation(hold, reservation_id)
    match hold.status:
        case HoldStatus.COMMITTED:
            raise FailedPrecondition(
                ErrorReason.HOLD_ALREADY_COMMITTED,
                f"reservation {reservation_id} was already committed by another request",
            )
        case HoldStatus.RELEASED:
            raise FailedPrecondition(
                ErrorReason.HOLD_RELEASED, f"reservation {reservation_id} was released"
            )
        case HoldStatus.EXPIRED:
            raise _expired(reservation_id)
    if hold.expires_at <= now:
        raise _expired(reservation_id)
    return hold


def require_reservation(hold: Hold | None, reservation_id: str) -> Hold:
    # A denied reservation never had an id given out: to a caller it does not exist.
    if hold is None or hold.status is HoldStatus.DENIED:
        raise NotFound(
            ErrorReason.RESERVATION_NOT_FOUND, f"reservation {reservation_id} does not exist"
        )
    return hold


def _expired(reservation_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        ErrorReason.HOLD_EXPIRED,
        f"reservation {reservation_id} expired and its hold was released; reserve again",
    )


def refund_amount(hold: Hold, charged_micros: int, requested_micros: int) -> int:
    """How much a refund of a committed hold gives back; 0 requested means all that is left."""
    refundable = charged_micros - hold.refunded_micros
    amount = requested_micros or refundable
    if refundable <= 0 or amount > refundable:
        raise FailedPrecondition(
            ErrorReason.REFUND_EXCEEDS_CHARGE,
            f"reservation {hold.hold_id} has {refundable} micros left to refund, "
            f"{amount} were asked",
            {"refundable_micros": str(max(0, refundable)), "requested_micros": str(amount)},
        )
    return amount


def check_releasable(hold: Hold, requested_micros: int) -> None:
    if hold.status is HoldStatus.RELEASED:
        raise FailedPrecondition(
            ErrorReason.HOLD_RELEASED, f"reservation {hold.hold_id} was released"
        )
    if hold.status is HoldStatus.EXPIRED:
        raise _expired(hold.hold_id)
    if requested_micros:
        raise FailedPrecondition(
            ErrorReason.PARTIAL_RELEASE_NOT_ALLOWED,
            f"reservation {hold.hold_id} is not committed: amount_micros must be 0 to release it",
        )
