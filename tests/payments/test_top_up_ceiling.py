"""The monthly ceiling on automatic top-ups, end to end: gRPC -> server -> our Stripe proxy ->
localstripe. Charges are counted where they happen (PaymentIntent creates that reached Stripe)
and where they land (TOP_UP ledger entries); months pass on an injected clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import grpc
import pytest

from billing.v1 import account_pb2, billing_pb2, types_pb2
from billing_service.domain.ledger import EntryKind
from billing_service.domain.payments import ChargeStatus, ChargeTrigger
from tests.payments.conftest import CARD_OK, Payments, new_id, serving
from tests.payments.test_cards_and_charges import (
    INCLUDED,
    METERED,
    balance,
    profile,
    reserve,
    top_up_entries,
    top_up_now,
)
from tests.support.clock import FakeClock
from tests.support.grpc_errors import rich_error
from tests.support.localstripe import LocalStripe
from tests.support.stripe_proxy import StripeFaultProxy

TOP_UP = 5_000_000
CEILING = 10_000_000
PAYMENT_INTENTS = "/v1/payment_intents"


@pytest.fixture
def proxy(localstripe: LocalStripe) -> Iterator[StripeFaultProxy]:
    with StripeFaultProxy(localstripe.url) as proxy:
        yield proxy


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2026, 11, 27, 12, 0, tzinfo=UTC))


@pytest.fixture
async def payments(
    database_url: str, localstripe: LocalStripe, proxy: StripeFaultProxy, clock: FakeClock
) -> AsyncIterator[Payments]:
    # Months pass on the clock while the tests' holds stay open: no sweep may expire them.
    async with serving(
        database_url, proxy.url, localstripe, clock, expiry_sweep_interval_s=3600
    ) as payments:
        yield payments


def intents_created(proxy: StripeFaultProxy) -> int:
    return proxy.forwarded(PAYMENT_INTENTS, "POST")


async def update_auto_top_up(
    payments: Payments, tenant_id: str, request_id: str | None = None, **fields: int
) -> types_pb2.AutoTopUpSettings:
    answer = await payments.account.UpdateAutoTopUp(
        account_pb2.UpdateAutoTopUpRequest(
            request_id=request_id or new_id("auto"), tenant_id=tenant_id, **fields
        )
    )
    return answer.auto_top_up


async def tenant_with_ceiling(payments: Payments, threshold_micros: int) -> str:
    """$1 of credit, a good card, $5 top-ups and a $10 monthly ceiling."""
    tenant_id = await payments.create_tenant(credit_limit_micros=1_000_000)
    await payments.save_card(tenant_id, CARD_OK)
    await update_auto_top_up(
        payments,
        tenant_id,
        threshold_micros=threshold_micros,
        amount_micros=TOP_UP,
        monthly_limit_micros=CEILING,
    )
    return tenant_id


async def run_worker_round(payments: Payments, tenant_id: str) -> None:
    """A round of ours, then waits for the tenant's charges: the server's own worker, woken
    by a settings change, may be the one sending them."""
    worker = payments.app.charge_worker
    assert worker is not None
    await worker.run_once()
    for charge in await payments.charges(tenant_id):
        settled = await worker.wait_until_settled(charge.charge_id, 30.0)
        assert settled is not None
        assert settled.status is not ChargeStatus.PENDING


async def automatic_top_up_credits(payments: Payments, tenant_id: str) -> list[int]:
    charges = {c.charge_id: c for c in await payments.charges(tenant_id)}
    return [
        amount
        for kind, amount, charge_id in await top_up_entries(payments, tenant_id)
        if kind == EntryKind.TOP_UP and charges[charge_id].trigger is not ChargeTrigger.MANUAL
    ]


async def test_on_demand_top_ups_stop_at_the_ceiling_and_the_reservation_is_denied(
    payments: Payments, proxy: StripeFaultProxy
) -> None:
    tenant_id = await tenant_with_ceiling(payments, threshold_micros=0)

    # $1 available, each $4 reservation needs a $5 top-up: two fit under the $10 ceiling.
    assert (await reserve(payments, tenant_id, METERED, 4_000_000)).allowed
    assert (await reserve(payments, tenant_id, METERED, 4_000_000)).allowed
    request = billing_pb2.ReserveCreditRequest(
        request_id=new_id("reserve"),
        tenant_id=tenant_id,
        user_id="user-1",
        model=METERED,
        amount_micros=4_000_000,
    )
    denied = (await payments.billing.ReserveCredit(request, timeout=20.0)).decision

    assert not denied.allowed
    assert denied.reason == types_pb2.DENIAL_REASON_TOP_UP_LIMIT_REACHED
    assert "top up now or raise the monthly limit" in denied.message
    assert denied.available_credit_micros == 3_000_000
    assert intents_created(proxy) == 2
    assert await automatic_top_up_credits(payments, tenant_id) == [TOP_UP, TOP_UP]
    money = await balance(payments, tenant_id)
    assert (money.balance_micros, money.held_micros) == (10_000_000, 8_000_000)
    shown = await profile(payments, tenant_id)
    assert shown.automatic_top_ups_this_month_micros == CEILING
    assert shown.auto_top_up.monthly_limit_micros == CEILING
    # The denial is stored: a retry replays it and charges nothing.
    replayed = (await payments.billing.ReserveCredit(request, timeout=20.0)).decision
    assert replayed.reason == types_pb2.DENIAL_REASON_TOP_UP_LIMIT_REACHED
    assert intents_created(proxy) == 2
    # Included models do not need credit.
    assert (await reserve(payments, tenant_id, INCLUDED, 4_000_000)).allowed


async def test_a_manual_top_up_resumes_automatic_top_ups(
    payments: Payments, proxy: StripeFaultProxy
) -> None:
    tenant_id = await tenant_with_ceiling(payments, threshold_micros=0)
    for _ in range(2):
        assert (await reserve(payments, tenant_id, METERED, 4_000_000)).allowed
    assert (await reserve(payments, tenant_id, METERED, 4_000_000)).reason == (
        types_pb2.DENIAL_REASON_TOP_UP_LIMIT_REACHED
    )

    manual = await top_up_now(payments, tenant_id, 500_000)
    assert manual.status == account_pb2.CHARGE_STATUS_SUCCEEDED

    # $3.50 available: the $4 reservation still needs a top-up, and may have one again.
    assert (await reserve(payments, tenant_id, METERED, 4_000_000)).allowed
    assert intents_created(proxy) == 4
    assert await automatic_top_up_credits(payments, tenant_id) == [TOP_UP] * 3
    money = await balance(payments, tenant_id)
    assert (money.balance_micros, money.held_micros) == (15_500_000, 12_000_000)
    # The profile shows what automatic charges took this month, past the ceiling once a
    # person said yes.
    assert (await profile(payments, tenant_id)).automatic_top_ups_this_month_micros == 15_000_000


async def test_automatic_top_ups_stop_at_the_ceiling_and_a_raised_ceiling_resumes_them(
    payments: Payments, proxy: StripeFaultProxy, clock: FakeClock
) -> None:
    # A threshold above anything reachable: every round wants a top-up.
    tenant_id = await tenant_with_ceiling(payments, threshold_micros=1_000_000_000)
    assert payments.app.account is not None
    store = payments.app.account.store

    for _ in range(4):
        await run_worker_round(payments, tenant_id)

    charges = await payments.charges(tenant_id)
    assert [(c.trigger, c.status) for c in charges] == [
        (ChargeTrigger.AUTOMATIC, ChargeStatus.SUCCEEDED)
    ] * 2
    assert intents_created(proxy) == 2
    assert (await balance(payments, tenant_id)).balance_micros == CEILING
    assert await store.tenants_due_for_top_up(100, clock()) == []

    raised = await update_auto_top_up(payments, tenant_id, monthly_limit_micros=17_000_000)
    assert raised.monthly_limit_micros == 17_000_000
    for _ in range(3):
        await run_worker_round(payments, tenant_id)

    # $10 + $5 fits under $17; another $5 would not (a charge is made whole or not at all).
    assert intents_created(proxy) == 3
    assert await automatic_top_up_credits(payments, tenant_id) == [TOP_UP] * 3
    assert (await profile(payments, tenant_id)).automatic_top_ups_this_month_micros == 15_000_000


async def test_the_next_month_resumes_automatic_top_ups(
    payments: Payments, proxy: StripeFaultProxy, clock: FakeClock
) -> None:
    tenant_id = await tenant_with_ceiling(payments, threshold_micros=0)
    for _ in range(2):
        assert (await reserve(payments, tenant_id, METERED, 4_000_000)).allowed
    assert (await reserve(payments, tenant_id, METERED, 4_000_000)).reason == (
        types_pb2.DENIAL_REASON_TOP_UP_LIMIT_REACHED
    )

    clock.now = datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC)
    assert (await reserve(payments, tenant_id, METERED, 4_000_000)).reason == (
        types_pb2.DENIAL_REASON_TOP_UP_LIMIT_REACHED
    )
    clock.now = datetime(2026, 12, 1, 0, 0, tzinfo=UTC)
    assert (await profile(payments, tenant_id)).automatic_top_ups_this_month_micros == 0

    assert (await reserve(payments, tenant_id, METERED, 4_000_000)).allowed
    assert intents_created(proxy) == 3
    assert (await profile(payments, tenant_id)).automatic_top_ups_this_month_micros == TOP_UP


async def test_the_default_ceiling_is_ten_top_ups(payments: Payments) -> None:
    tenant_id = await payments.create_tenant()
    settings = (await profile(payments, tenant_id)).auto_top_up
    assert settings.monthly_limit_micros == 10 * settings.amount_micros

    changed = await update_auto_top_up(payments, tenant_id, amount_micros=3_000_000)
    assert changed.monthly_limit_micros == 30_000_000
    fixed = await update_auto_top_up(payments, tenant_id, monthly_limit_micros=0)
    assert fixed.monthly_limit_micros == 0
    again = await update_auto_top_up(payments, tenant_id, amount_micros=4_000_000)
    assert again.monthly_limit_micros == 0  # set by the tenant: no longer follows the amount


@pytest.mark.parametrize("bad", [-1, 1_000_000_000_001])
async def test_an_invalid_ceiling_is_refused_naming_the_field(payments: Payments, bad: int) -> None:
    tenant_id = await payments.create_tenant()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await update_auto_top_up(payments, tenant_id, monthly_limit_micros=bad)

    error = rich_error(raised.value)
    assert (error.code, error.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["monthly_limit_micros"],
    )
    settings = (await profile(payments, tenant_id)).auto_top_up
    assert settings.monthly_limit_micros == 10 * settings.amount_micros


async def test_update_auto_top_up_replays_its_first_answer(payments: Payments) -> None:
    tenant_id = await payments.create_tenant()
    request_id = new_id("auto")
    first = await update_auto_top_up(
        payments, tenant_id, request_id=request_id, monthly_limit_micros=40_000_000
    )
    await update_auto_top_up(payments, tenant_id, monthly_limit_micros=50_000_000)

    replayed = await update_auto_top_up(
        payments, tenant_id, request_id=request_id, monthly_limit_micros=40_000_000
    )

    assert replayed == first
    assert replayed.monthly_limit_micros == 40_000_000
    assert (await profile(payments, tenant_id)).auto_top_up.monthly_limit_micros == 50_000_000
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await update_auto_top_up(
            payments, tenant_id, request_id=request_id, monthly_limit_micros=60_000_000
        )
    error = rich_error(raised.value)
    assert (error.code, error.reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert (await profile(payments, tenant_id)).auto_top_up.monthly_limit_micros == 50_000_000
