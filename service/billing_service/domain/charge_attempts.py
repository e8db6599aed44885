"""What the charge worker does next with a charge that has no outcome yet, and when.

A charge is sent to Stripe as a PaymentIntent create with the idempotency key
`charge-<charge_id>` and the parameters fixed when it was decided. Stripe keeps a key for at
least 24 hours and answers a repeated key with the first answer, so within that window
resending is how a lost answer is learned. Past it, a resend could charge a second time: the
PaymentIntent is looked for instead, by the charge id in its metadata. A charge whose outcome
cannot be learned is never guessed to have failed.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum

from billing_service.domain.payments import Charge

# Stripe keeps idempotency keys for at least 24 hours; past this a key may be forgotten.
RESEND_WINDOW = timedelta(hours=20)
# After an attempt whose outcome is unknown, the next waits this long, doubling per attempt.
RETRY_DELAY_MIN = timedelta(seconds=5)
RETRY_DELAY_MAX = timedelta(minutes=10)
# How far before the charge's decision a PaymentIntent found for it may have been created
# (clocks of replicas and Stripe differ a little).
FIND_SINCE_MARGIN = timedelta(hours=1)


class ChargeStep(StrEnum):
    # Create the PaymentIntent: the first time, or again with the same key and parameters.
    SEND = "send"
    # Read the PaymentIntent by its id (it is known; Stripe has not finished with it).
    READ = "read"
    # The key may be forgotten: find the PaymentIntent by the charge id in its metadata.
    FIND = "find"
    # Never sent, and the card it was decided for is gone or the tenant is suspended: not made.
    ABANDON = "abandon"


def next_step(
    charge: Charge, now: datetime, *, card_on_file: str | None, tenant_active: bool
) -> ChargeStep:
    if charge.payment_intent_id is not None:
        return ChargeStep.READ
    if charge.sent_at is None:
        if (
            charge.stripe_customer_id is None
            or charge.payment_method_id is None
            or charge.payment_method_id != card_on_file
            or not tenant_active
        ):
            return ChargeStep.ABANDON
        return ChargeStep.SEND
    if charge.payment_method_id is None or now - charge.sent_at >= RESEND_WINDOW:
        # A resend could be another request than the first: only Stripe's records can tell.
        return ChargeStep.FIND
    return ChargeStep.SEND


def abandon_reason(charge: Charge, *, card_on_file: str | None, tenant_active: bool) -> str:
    if not tenant_active:
        return "Not made: the tenant was suspended before the charge was sent."
    if card_on_file is None:
        return "Not made: the card was removed before the charge was sent."
    return "Not made: the card was replaced before the charge was sent; top up again."


def retry_delay(attempts: int) -> timedelta:
    """The wait before the next attempt, after `attempts` attempts (at least 1)."""
    doublings = min(max(attempts, 1) - 1, 16)
    return min(RETRY_DELAY_MIN * (1 << doublings), RETRY_DELAY_MAX)
