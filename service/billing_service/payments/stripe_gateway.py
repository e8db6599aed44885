"""The PaymentGateway over the official Stripe SDK (stripe.StripeClient, async methods).

Transient faults (network errors, 429, 5xx) are retried with tenacity and exponential
backoff; a decline is an answer, never retried. Every create carries an idempotency key, so a
retry after a lost response gets Stripe's stored answer instead of a second object. Calls are
paced below Stripe's rate limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import stripe
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from billing_service.domain.payments import PaymentOutcome
from billing_service.payments.gateway import (
    CardDetails,
    GatewayNotFound,
    GatewayRefused,
    GatewayUnavailable,
    PaymentResult,
    SetupIntentCreated,
    SetupIntentState,
)

T = TypeVar("T")

_DECLINED_STATUSES = frozenset({"requires_payment_method", "canceled"})
_LIST_PAGE = 100
# A charge's PaymentIntent is looked for among this many of its customer's (since the charge).
_FIND_PAGES_MAX = 10


def _transient(error: BaseException) -> bool:
    if isinstance(error, stripe.APIConnectionError | stripe.RateLimitError):
        return True
    # 409: the same idempotency key is still in flight (an earlier attempt): try again later.
    status = getattr(error, "http_status", None)
    return (
        isinstance(error, stripe.StripeError)
        and isinstance(status, int)
        and (status >= 500 or status == 409)
    )


class Pacer:
    """At most `rate` calls per second from this process. Written by hand: a minimum spacing
    between call starts is all that is needed, not a general token bucket."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self._lock:
            now = time.monotonic()
            delay = self._next - now
            self._next = max(now, self._next) + self._interval
        if delay > 0:
            await asyncio.sleep(delay)


class StripeGateway:
    def __init__(
        self,
        api_key: str,
        *,
        api_base: str | None = None,
        currency: str = "usd",
        attempts: int = 4,
        max_backoff_s: float = 8.0,
        requests_per_second: float = 20.0,
        timeout_s: float = 30.0,
    ) -> None:
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else {},
            http_client=stripe.HTTPXClient(timeout=timeout_s),
            max_network_retries=0,
        )
        self._currency = currency
        self._attempts = attempts
        self._max_backoff_s = max_backoff_s
        self._pacer = Pacer(requests_per_second)

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_transient),
                stop=stop_after_attempt(self._attempts),
                wait=wait_exponential_jitter(multiplier=0.2, max=self._max_backoff_s),
                reraise=True,
            ):
                with attempt:
                    await self._pacer.wait()
                    return await call()
        except RetryError as error:  # pragma: no cover - reraise=True raises the cause
            raise GatewayUnavailable(str(error)) from error
        except stripe.StripeError as error:
            if _transient(error):
                raise GatewayUnavailable(_message(error)) from error
            if getattr(error, "http_status", None) == 404:
                raise GatewayNotFound(_message(error)) from error
            raise
        raise AssertionError("unreachable")

    async def create_customer(self, tenant_id: str, *, idempotency_key: str) -> str:
        customer = await self._call(
            lambda: self._client.v1.customers.create_async(
                {"metadata": {"tenant_id": tenant_id}},
                {"idempotency_key": idempotency_key},
            )
        )
        return str(customer.id)

    async def create_setup_intent(
        self, customer_id: str, *, idempotency_key: str
    ) -> SetupIntentCreated:
        intent = await self._call(
            lambda: self._client.v1.setup_intents.create_async(
                {"customer": customer_id, "usage": "off_session"},
                {"idempotency_key": idempotency_key},
            )
        )
        return SetupIntentCreated(str(intent.id), str(intent.client_secret))

    async def get_setup_intent(self, setup_intent_id: str) -> SetupIntentState:
        intent = await self._call(
            lambda: self._client.v1.setup_intents.retrieve_async(setup_intent_id)
        )
        return SetupIntentState(
            str(intent.id),
            str(intent.status),
            _id_of(intent.customer),
            _id_of(intent.payment_method),
        )

    async def get_client_secret(self, setup_intent_id: str) -> str:
        intent = await self._call(
            lambda: self._client.v1.setup_intents.retrieve_async(setup_intent_id)
        )
        return str(intent.client_secret)

    async def get_card(self, payment_method_id: str) -> CardDetails:
        method = await self._call(
            lambda: self._client.v1.payment_methods.retrieve_async(payment_method_id)
        )
        card = method.card
        return CardDetails(
            str(method.id),
            _id_of(method.customer),
            str(card.brand) if card else "",
            str(card.last4) if card else "",
        )

    async def attach_card(self, payment_method_id: str, customer_id: str) -> None:
        try:
            await self._call(
                lambda: self._client.v1.payment_methods.attach_async(
                    payment_method_id, {"customer": customer_id}
                )
            )
        except stripe.CardError as error:
            raise GatewayRefused(_message(error)) from error

    async def set_default_card(self, customer_id: str, payment_method_id: str) -> None:
        await self._call(
            lambda: self._client.v1.customers.update_async(
                customer_id, {"invoice_settings": {"default_payment_method": payment_method_id}}
            )
        )

    async def detach_card(self, payment_method_id: str) -> None:
        # Already detached or deleted at Stripe: the outcome wanted.
        with contextlib.suppress(GatewayNotFound, stripe.InvalidRequestError):
            await self._call(
                lambda: self._client.v1.payment_methods.detach_async(payment_method_id)
            )

    @property
    def currency(self) -> str:
        return self._currency

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
        params: dict[str, Any] = {
            "amount": amount_cents,
            "currency": currency,
            "customer": customer_id,
            "payment_method": payment_method_id,
            "off_session": True,
            "confirm": True,
            "metadata": {"charge_id": charge_id},
        }
        try:
            intent = await self._call(
                lambda: self._client.v1.payment_intents.create_async(
                    params,  # type: ignore[arg-type]
                    {"idempotency_key": idempotency_key},
                )
            )
        except stripe.CardError as error:
            return _card_error_result(error)
        except (stripe.InvalidRequestError, stripe.IdempotencyError, GatewayNotFound) as error:
            # Refused before anything was charged by this request (a key Stripe knows with
            # other parameters, a payment method it no longer accepts, ...).
            raise GatewayRefused(_text(error)) from error
        return _result(intent)

    async def get_payment(self, payment_intent_id: str) -> PaymentResult:
        intent = await self._call(
            lambda: self._client.v1.payment_intents.retrieve_async(payment_intent_id)
        )
        return _result(intent)

    async def _list_payments(self, params: dict[str, Any]) -> Any:
        return await self._call(
            lambda: self._client.v1.payment_intents.list_async(params)  # type: ignore[arg-type]
        )

    async def find_payments(
        self, *, customer_id: str, charge_id: str, created_since: datetime
    ) -> list[PaymentResult]:
        params: dict[str, Any] = {
            "customer": customer_id,
            "created": {"gte": int(created_since.timestamp())},
            "limit": _LIST_PAGE,
        }
        found: list[PaymentResult] = []
        for _ in range(_FIND_PAGES_MAX):
            page = await self._list_payments(params)
            found += [_result(intent) for intent in page.data if _charge_of(intent) == charge_id]
            if not page.has_more or not page.data:
                return found
            params = {**params, "starting_after": page.data[-1].id}
        raise GatewayRefused(
            f"more than {_LIST_PAGE * _FIND_PAGES_MAX} PaymentIntents of {customer_id} "
            "since the charge: too many to read"
        )


def _result(intent: Any) -> PaymentResult:
    status = str(intent.status)
    error = getattr(intent, "last_payment_error", None)
    message = str(error.message) if error is not None and error.message else None
    amount = getattr(intent, "amount", None)
    currency = getattr(intent, "currency", None)
    about: dict[str, Any] = {
        "amount_cents": amount if isinstance(amount, int) else None,
        "currency": str(currency) if currency else None,
        "charge_id": _charge_of(intent),
    }
    if status == "succeeded":
        return PaymentResult(PaymentOutcome.SUCCEEDED, str(intent.id), None, **about)
    if status == "requires_action":
        return PaymentResult(
            PaymentOutcome.REQUIRES_ACTION,
            str(intent.id),
            message or "The card holder must authenticate this payment.",
            **about,
        )
    if status in _DECLINED_STATUSES:
        return PaymentResult(
            PaymentOutcome.DECLINED, str(intent.id), message or "The card was declined.", **about
        )
    return PaymentResult(None, str(intent.id), None, **about)


def _charge_of(intent: Any) -> str | None:
    metadata = getattr(intent, "metadata", None)
    values = metadata.to_dict() if metadata is not None else {}
    charge_id = values.get("charge_id")
    return charge_id if isinstance(charge_id, str) else None


def _text(error: Exception) -> str:
    return _message(error) if isinstance(error, stripe.StripeError) else str(error)


def _card_error_result(error: stripe.CardError) -> PaymentResult:
    """A 402: declined, or (real Stripe) authentication_required with the intent in the body."""
    body = error.json_body or {}
    details = body.get("error", {}) if isinstance(body, dict) else {}
    intent = details.get("payment_intent") or {}
    intent_id = intent.get("id") if isinstance(intent, dict) else None
    if error.code == "authentication_required":
        return PaymentResult(PaymentOutcome.REQUIRES_ACTION, intent_id, _message(error))
    return PaymentResult(PaymentOutcome.DECLINED, intent_id, _message(error))


def _id_of(value: Any) -> str | None:
    if value is None:
        return None
    return str(value) if isinstance(value, str) else str(value.id)


def _message(error: stripe.StripeError) -> str:
    return str(error.user_message or error._message or type(error).__name__)
