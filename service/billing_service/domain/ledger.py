"""Settlement rules: what a commit debits, what a release and a refund may give back, which
holds can settle.

A hold settles once: a commit, a release or an expiry, whichever comes first. A release only
ever gives back an open hold before its expire time (after it, the request expires the hold, as
the sweep would); a refund only ever gives back part of a committed charge. Neither turns into
the other. The ledger itself (entries, balances) lives in storage; these functions decide, and
storage applies (its one-statement SQL applies `is_live` through storage.hold_sql).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

from billing_service.domain.errors import ErrorReason, FailedPrecondition, NotFound
from billing_service.domain.model import Hold, HoldStatus
from billing_service.domain.pricing import ModelBilling


class EntryKind(StrEnum):
    """Every change of money is one immutable ledger entry of one of these kinds."""

    GRANT = "grant"  # operator credit: balance +
    HOLD = "hold"  # held +
    EXTENSION = "extension"  # held + (an open hold grown by ExtendHold)
    RELEASE = "release"  # held - (released by a Release before commit)
    EXPIRY = "expiry"  # held - (released at its expire time)
    DEBIT = "debit"  # held - the hold, balance - the charge (a commit)
    REFUND = "refund"  # balance + (part of a committed charge given back)
    TOP_UP = "top_up"  # balance + (a card charge succeeded; carries its charge id)
    TOP_UP_REVERSAL = "top_up_reversal"  # balance - (a card charge refunded or disputed)


class ReleaseAction(StrEnum):
    """What a release request does to a hold that can still settle."""

    RELEASE = "release"  # open, before its expire time: the whole hold is given back
    EXPIRE = "expire"  # open, past its expire time: expired exactly as the sweep does


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


def covered_by_hold(hold: Hold, cost_micros: int) -> bool:
    """Whether a commit of `hold` at `cost_micros` is charged whole whatever the tenant's
    available credit (settle gives the same answer for any): the cost is within the hold, which
    was granted inside the cap, so no read of the account is needed to settle it."""
    return cost_micros <= hold.amount_micros


def held_micros(hold: Hold) -> int:
    """What an open hold keeps of the tenant's credit, and a release gives back: its amount for
    a metered model; a hold of an included model keeps nothing."""
    return held_by(hold.price.billing if hold.price else None, hold.amount_micros)


def held_by(billing: ModelBilling | None, amount_micros: int) -> int:
    """held_micros of a hold known by its model's billing and amount (a row the expiry sweep
    claimed): what its release or expiry gives back, 0 when it moves no money."""
    return amount_micros if billing is ModelBilling.METERED else 0


def is_live(hold: Hold, now: datetime) -> bool:
    """Whether `hold` can still be committed or released: open, and its expire time not
    reached. One that is open past it is due to expire, swept or not."""
    return hold.status is HoldStatus.OPEN and now < hold.expires_at


def check_committable(hold: Hold | None, reservation_id: str, now: datetime) -> Hold:
    """Raises the error that explains why `hold` cannot be committed, if it cannot."""
    hold = require_reservation(hold, reservation_id)
    _check_not_settled(hold, "committed by another request")
    if not is_live(hold, now):
        raise hold_expired(reservation_id)
    return hold


def decide_release(hold: Hold | None, reservation_id: str, now: datetime) -> ReleaseAction:
    """What a release does to `hold`; raises why it does nothing when it does nothing.

    A committed hold is never touched: a release that lost the race with a commit fails with
    HOLD_ALREADY_COMMITTED and refunds nothing (only a Refund that asks for an amount does).
    """
    hold = require_reservation(hold, reservation_id)
    _check_not_settled(hold, "committed: a release never refunds a charge")
    return ReleaseAction.RELEASE if is_live(hold, now) else ReleaseAction.EXPIRE


def check_extendable(hold: Hold | None, reservation_id: str, now: datetime) -> bool:
    """Whether `hold` can grow: True while it is live; False when it is open past its expire
    time (the request expires it, as the sweep would, and answers HOLD_EXPIRED); raises why
    not when it is settled or unknown. Only a live hold is ever extended."""
    hold = require_reservation(hold, reservation_id)
    _check_not_settled(hold, "committed: a committed hold no longer grows")
    return is_live(hold, now)


def check_refundable(
    hold: Hold | None, reservation_id: str, now: datetime, *, refund_all: bool
) -> Hold:
    """Returns `hold` if it is committed (a refund gives back part of its charge); else raises
    why not. A refund never releases or expires a hold: that is a release's or the sweep's."""
    hold = require_reservation(hold, reservation_id)
    if hold.status is HoldStatus.COMMITTED:
        return hold
    _check_not_settled(hold, "committed")
    if not is_live(hold, now):
        raise hold_expired(reservation_id)
    if refund_all:
        raise FailedPrecondition(
            ErrorReason.HOLD_NOT_COMMITTED,
            f"reservation {reservation_id} is not committed: there is no charge to refund; "
            "send Release to give the hold back",
        )
    raise FailedPrecondition(
        ErrorReason.PARTIAL_RELEASE_NOT_ALLOWED,
        f"reservation {reservation_id} is not committed: an open hold is released whole, "
        "by Release",
    )


def _check_not_settled(hold: Hold, committed: str) -> None:
    match hold.status:
        case HoldStatus.COMMITTED:
            raise FailedPrecondition(
                ErrorReason.HOLD_ALREADY_COMMITTED,
                f"reservation {hold.hold_id} was already {committed}",
            )
        case HoldStatus.RELEASED:
            raise FailedPrecondition(
                ErrorReason.HOLD_RELEASED, f"reservation {hold.hold_id} was released"
            )
        case HoldStatus.EXPIRED:
            raise hold_expired(hold.hold_id)


def require_reservation(hold: Hold | None, reservation_id: str) -> Hold:
    # A denied reservation never had an id given out: to a caller it does not exist.
    if hold is None or hold.status is HoldStatus.DENIED:
        raise NotFound(
            ErrorReason.RESERVATION_NOT_FOUND, f"reservation {reservation_id} does not exist"
        )
    return hold


def hold_expired(reservation_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        ErrorReason.HOLD_EXPIRED,
        f"reservation {reservation_id} expired and its hold was released; reserve again",
    )


def refund_amount(hold: Hold, charged_micros: int, requested_micros: int, refund_all: bool) -> int:
    """How much a refund of a committed hold gives back: `requested_micros`, or with
    `refund_all` all that is left."""
    refundable = charged_micros - hold.refunded_micros
    amount = refundable if refund_all else requested_micros
    if refundable <= 0 or not 0 < amount <= refundable:
        raise FailedPrecondition(
            ErrorReason.REFUND_EXCEEDS_CHARGE,
            f"reservation {hold.hold_id} has {refundable} micros left to refund, "
            f"{amount} were asked",
            {"refundable_micros": str(max(0, refundable)), "requested_micros": str(amount)},
        )
    return amount


def extension_answer(hold: Hold, amount_micros: int, expires_at: datetime) -> Hold:
    """The hold an ExtendHold answers with: open, with the amount and expire time the decision
    left it (the rest as granted), the same whether answered first or replayed."""
    return replace(hold.as_granted(), amount_micros=amount_micros, expires_at=expires_at)


def extended(hold: Hold, amount_micros: int, now: datetime, ttl: timedelta) -> Hold:
    """`hold` grown by an ExtendHold granted `amount_micros`: its expire time moves to `now` +
    `ttl` unless it was later already, and the amount and expire time as first granted are
    kept (Hold.as_granted)."""
    return replace(
        hold,
        amount_micros=hold.amount_micros + amount_micros,
        extended_micros=hold.extended_micros + amount_micros,
        expires_at=max(hold.expires_at, now + ttl),
        granted_expires_at=hold.granted_expires_at or hold.expires_at,
    )
