"""What the payments core needs from Stripe, as a small Protocol (the core never imports stripe)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from billing_service.domain.payments import PaymentOutcome


class GatewayUnavailable(Exception):
    """Stripe could not be reached or answered 429/5xx after the retries; try again later."""


class GatewayNotFound(Exception):
    """Stripe has no such object (or it belongs to another account)."""


class GatewayRefused(Exception):
    """Stripe refused the request (e.g. a card declined at attach, a PaymentIntent create with
    parameters it rejects, or an idempotency key it knows with other parameters); `message`
    says why. Nothing was created by this request, but an earlier one with the same key may
    have been."""


@dataclass(frozen=True, slots=True)
class SetupIntentCreated:
    setup_intent_id: str
    client_secret: str


@dataclass(frozen=True, slots=True)
class SetupIntentState:
    setup_intent_id: str
    status: str
    customer_id: str | None
    payment_method_id: str | None


@dataclass(frozen=True, slots=True)
class CardDetails:
    payment_method_id: str
    customer_id: str | None
    brand: str
    last4: str


@dataclass(frozen=True, slots=True)
class PaymentResult:
    """Stripe's answer to an off-session charge. outcome None: not final yet (processing)."""

    outcome: PaymentOutcome | None
    payment_intent_id: str | None
    failure_message: str | None
    # What the PaymentIntent is for, when Stripe's answer carries it (charge_id: its
    # metadata's).
    amount_cents: int | None = None
    currency: str | None = None
    charge_id: str | None = None


class PaymentGateway(Protocol):
    async def create_customer(self, tenant_id: str, *, idempotency_key: str) -> str: ...

    async def create_setup_intent(
        self, customer_id: str, *, idempotency_key: str
    ) -> SetupIntentCreated: ...

    async def get_setup_intent(self, setup_intent_id: str) -> SetupIntentState: ...

    async def get_client_secret(self, setup_intent_id: str) -> str: ...

    async def get_card(self, payment_method_id: str) -> CardDetails: ...

    async def attach_card(self, payment_method_id: str, customer_id: str) -> None: ...

    async def set_default_card(self, customer_id: str, payment_method_id: str) -> None: ...

    async def detach_card(self, payment_method_id: str) -> None: ...

    async def charge(
        self,
        *,
        customer_id: str,
        payment_method_id: str,
        amount_cents: int,
        currency: str,
        charge_id: str,
        idempotency_key: str,
    ) -> PaymentResult:
        """Creates and confirms an off-session PaymentIntent with metadata charge_id; a
        decline is an answer. GatewayRefused: Stripe refused the request itself."""
        ...

    async def get_payment(self, payment_intent_id: str) -> PaymentResult: ...

    async def find_payments(
        self, *, customer_id: str, charge_id: str, created_since: datetime
    ) -> list[PaymentResult]:
        """The customer's PaymentIntents created since then whose metadata names the charge,
        read from a list Stripe answers consistently (not the search API, which lags).
        GatewayRefused: Stripe cannot say (e.g. far too many PaymentIntents to read)."""
        ...
