"""The Stripe adapter's retry rule: network errors, 429, 409 and 5xx are retried with the same
request; a decline is an answer, never retried. Money conversions are exact."""

from __future__ import annotations

import pytest
import stripe

from billing_service.domain.errors import InvalidArgument
from billing_service.domain.payments import (
    cents_to_micros,
    check_top_up_amount,
    micros_to_cents,
    on_demand_amount,
    round_up_to_cents,
)
from billing_service.payments.gateway import GatewayUnavailable
from billing_service.payments.stripe_gateway import StripeGateway


def _gateway(attempts: int = 4) -> StripeGateway:
    return StripeGateway(
        "sk_test_unit", api_base="http://127.0.0.1:9", attempts=attempts, max_backoff_s=0.01
    )


class Flaky:
    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "answer"


@pytest.mark.parametrize(
    "error",
    [
        stripe.APIConnectionError("reset"),
        stripe.RateLimitError("slow down", http_status=429),
        stripe.APIError("boom", http_status=500),
        stripe.InvalidRequestError("key in use", None, http_status=409),
    ],
)
async def test_transient_faults_are_retried(error: Exception) -> None:
    flaky = Flaky(error, error)
    assert await _gateway()._call(flaky) == "answer"
    assert flaky.calls == 3


async def test_too_many_faults_make_the_gateway_unavailable() -> None:
    flaky = Flaky(*(stripe.APIError("boom", http_status=503) for _ in range(5)))
    with pytest.raises(GatewayUnavailable):
        await _gateway(attempts=3)._call(flaky)
    assert flaky.calls == 3


async def test_a_decline_is_not_retried() -> None:
    flaky = Flaky(stripe.CardError("declined", None, "card_declined", http_status=402))
    with pytest.raises(stripe.CardError):
        await _gateway()._call(flaky)
    assert flaky.calls == 1


def test_cents_and_micros() -> None:
    assert cents_to_micros(1234) == 12_340_000
    assert micros_to_cents(12_340_000) == 1234
    with pytest.raises(ValueError, match="whole number of cents"):
        micros_to_cents(12_340_001)
    assert round_up_to_cents(1) == 10_000
    assert round_up_to_cents(10_000) == 10_000
    assert round_up_to_cents(10_001) == 20_000
    assert on_demand_amount(20_000_000, 25_000_001) == 25_010_000
    assert on_demand_amount(20_000_000, 1) == 20_000_000
    assert on_demand_amount(0, 1) == 500_000
    check_top_up_amount("amount_micros", 500_000)
    for bad in (490_000, 500_001, 10**12 + 10_000):
        with pytest.raises(InvalidArgument):
            check_top_up_amount("amount_micros", bad)
