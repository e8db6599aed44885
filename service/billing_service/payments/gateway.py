"""What the payments core needs from Stripe, as a small Protocol (the core never imports stripe)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from billing_service.domain.payments import PaymentOutcome


class GatewayUnavailable(Exception):
    """Stripe could not be reached or answered 429/5xx after the retries; try again later."""


class GatewayNotFound(Exception):
    """Stripe has no such object (or it belongs to another account)."""


class GatewayRefused(Exception):
    """Stripe refused the request (e.g. a card declined at attach); `message` says why."""


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
        charge_id: str,
        idempotency_key: str,
    ) -> PaymentResult: ...

    async def get_payment(self, payment_intent_id: str) -> PaymentResult: ...
