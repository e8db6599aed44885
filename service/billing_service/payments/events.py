"""What Stripe's webhooks tell the payments core, as plain facts.

The webhook endpoint verifies and parses an event and hands these facts to a
`StripeEventSink`; the payments core implements the sink. Every method must be
idempotent and order-insensitive: Stripe delivers at least once, in any order, so a fact
that arrives twice, or after a later one, changes nothing twice and never moves a charge
or a tenant backwards (e.g. `payment_intent_failed` after `payment_intent_succeeded` of
the same PaymentIntent is ignored).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True, slots=True)
class PaymentIntentFacts:
    payment_intent_id: str
    customer_id: str | None
    # Stripe amounts are in the currency's minor unit (cents); micros = cents * 10,000.
    amount_cents: int
    # Our charge id, from the PaymentIntent's metadata["charge_id"]; None for intents we did
    # not create.
    charge_id: str | None
    # The reason a failed intent gives (last_payment_error.message), else None.
    failure_message: str | None
    occurred_at: datetime


class StripeEventSink(Protocol):
    async def payment_intent_succeeded(self, facts: PaymentIntentFacts) -> None: ...

    async def payment_intent_failed(self, facts: PaymentIntentFacts) -> None: ...

    async def payment_intent_requires_action(self, facts: PaymentIntentFacts) -> None: ...

    async def payment_method_detached(
        self, *, payment_method_id: str, customer_id: str | None, occurred_at: datetime
    ) -> None: ...

    async def setup_intent_succeeded(
        self,
        *,
        setup_intent_id: str,
        customer_id: str | None,
        payment_method_id: str | None,
        occurred_at: datetime,
    ) -> None: ...

    async def charge_refunded(
        self,
        *,
        payment_intent_id: str,
        amount_refunded_cents: int,  # cumulative, as Stripe reports it
        occurred_at: datetime,
    ) -> None: ...

    async def dispute_created(
        self, *, payment_intent_id: str | None, customer_id: str | None, occurred_at: datetime
    ) -> None: ...
