"""Charges whose outcome the server cannot see at first, then something changes before it
learns it.

Every combination of a fault on the charge's PaymentIntent create (the answer is lost after
Stripe charged; Stripe answers 500 after charging; the call hangs past the caller's timeout)
with a change made while the charge is unresolved (a new card, the card removed, the tenant
suspended, the idempotency key forgotten by Stripe a day later), on one server with an
injected clock (on SQLite: test_unknown_charge_outcomes_replicas.py runs them on PostgreSQL
with server processes), against localstripe behind the replaying fault proxy, with faults for the
tenant's customer only. The books are checked against Stripe's own PaymentIntents
(charge_books.py): every success credited exactly once, nothing credited without one, no
charge left without an outcome, the monthly ceiling never passed.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from billing.v1 import account_pb2, admin_pb2
from billing_service.domain.payments import ChargeStatus, ChargeTrigger
from tests.payments.charge_books import charge_problems, intents_at_stripe
from tests.payments.conftest import CARD_OK, Payments, new_id, serving
from tests.support.clock import FakeClock
from tests.support.localstripe import LocalStripe
from tests.support.stripe_proxy import StripeFaultProxy

INTENTS = "/v1/payment_intents"
TOP_UP = 5_000_000
CEILING = 10_000_000
# A charge's Stripe call is cut off well within its lease; the hang outlasts that.
LEASE_S = 4.0
HANG_S = 3.0
FAULTS = ("response_lost", "server_error_after_charging", "hang")
CHANGES = ("card_changed", "card_removed", "tenant_suspended", "key_expired")


@pytest.fixture
def proxy(localstripe: LocalStripe) -> Iterator[StripeFaultProxy]:
    with StripeFaultProxy(localstripe.url) as proxy:
        yield proxy


def inject(proxy: StripeFaultProxy, fault: str, customer_id: str) -> None:
    """The fault on every PaymentIntent create of the customer until `clear_faults`."""
    if fault == "response_lost":
        proxy.drop_response_after_forwarding("POST", INTENTS, times=50, customer=customer_id)
    elif fault == "server_error_after_charging":
        proxy.status_500_after_forwarding("POST", INTENTS, times=50, customer=customer_id)
    else:
        proxy.hang(HANG_S, "POST", INTENTS, times=50, customer=customer_id)


async def make_change(
    change: str,
    payments: Payments,
    proxy: StripeFaultProxy,
    clock: FakeClock,
    tenant_id: str,
    customer_id: str,
) -> None:
    if change == "card_changed":
        await payments.save_card(tenant_id, CARD_OK)
    elif change == "card_removed":
        await payments.account.RemovePaymentMethod(
            account_pb2.RemovePaymentMethodRequest(request_id=new_id("remove"), tenant_id=tenant_id)
        )
    elif change == "tenant_suspended":
        await payments.admin.UpdateTenant(
            admin_pb2.UpdateTenantRequest(
                request_id=new_id("suspend"),
                tenant_id=tenant_id,
                status=admin_pb2.TENANT_STATUS_SUSPENDED,
            )
        )
    else:
        clock.advance(hours=21)
        proxy.forget_keys(customer=customer_id)


async def tenant_topping_up(payments: Payments, clock: FakeClock) -> tuple[str, str]:
    """$1 of credit, a good card, $5 automatic top-ups always due, a $10 monthly ceiling."""
    tenant_id = await payments.create_tenant(credit_limit_micros=1_000_000)
    saved = await payments.save_card(tenant_id, CARD_OK)
    assert payments.app.account is not None
    # Straight to the store: the RPC would wake the server's own worker before the fault.
    await payments.app.account.store.update_auto_top_up(
        tenant_id,
        True,
        1_000_000_000,
        TOP_UP,
        clock(),
        monthly_limit_micros=CEILING,
    )
    return tenant_id, saved.stripe_customer_id


async def worker_rounds_until_quiet(payments: Payments, clock: FakeClock) -> None:
    """Rounds, each past any retry delay and lease, until a round has nothing to do."""
    worker = payments.app.charge_worker
    assert worker is not None
    for _ in range(12):
        clock.advance(minutes=15)
        if await worker.run_once() == 0:
            return
    raise AssertionError("the charge worker still had work after 12 rounds")


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("fault", FAULTS)
async def test_a_charge_with_an_unknown_outcome_is_learned_and_credited_once(
    tmp_path: Path,
    localstripe: LocalStripe,
    proxy: StripeFaultProxy,
    fault: str,
    change: str,
) -> None:
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"
    clock = FakeClock()
    async with serving(
        database_url, proxy.url, localstripe, clock, charge_lease_s=LEASE_S
    ) as payments:
        worker = payments.app.charge_worker
        assert worker is not None
        tenant_id, customer_id = await tenant_topping_up(payments, clock)
        inject(proxy, fault, customer_id)

        await worker.run_once()  # the first automatic top-up reaches Stripe; no answer comes

        [first] = await payments.charges(tenant_id)
        assert first.status is ChargeStatus.PENDING
        [charged] = await intents_at_stripe(localstripe.url, customer_id)
        assert (charged.status, charged.charge_id) == ("succeeded", first.charge_id)
        await make_change(change, payments, proxy, clock, tenant_id, customer_id)
        proxy.clear_faults()
        await worker_rounds_until_quiet(payments, clock)

        assert (
            await charge_problems(
                payments.app.engine, localstripe.url, tenant_id, customer_id, CEILING
            )
            == []
        )
        settled = await payments.charges(tenant_id)
        assert settled[0].status is ChargeStatus.SUCCEEDED
        assert all(charge.trigger is ChargeTrigger.AUTOMATIC for charge in settled)
        if change in ("card_removed", "tenant_suspended"):
            assert len(settled) == 1  # nothing more is charged


async def timed_top_ups(servers: list[Payments], tenants: list[str]) -> list[tuple[int, float]]:
    """Each tenant tops up $1 at once, the calls spread over the servers; (status, seconds)
    of each answer."""

    async def one(payments: Payments, tenant_id: str) -> tuple[int, float]:
        started = time.perf_counter()
        answer = await payments.account.TopUpNow(
            account_pb2.TopUpNowRequest(
                request_id=new_id("topup"), tenant_id=tenant_id, amount_micros=1_000_000
            ),
            timeout=4 * HANG_S,
        )
        return answer.charge.status, time.perf_counter() - started

    return await asyncio.gather(
        *(one(servers[i % len(servers)], tenant_id) for i, tenant_id in enumerate(tenants))
    )


async def test_one_tenants_hanging_charges_do_not_delay_the_others(
    database_url: str, localstripe: LocalStripe, proxy: StripeFaultProxy
) -> None:
    async with serving(database_url, proxy.url, localstripe, charge_lease_s=LEASE_S) as payments:
        stuck = await payments.create_tenant()
        stuck_customer = (await payments.save_card(stuck, CARD_OK)).stripe_customer_id
        others = [await payments.create_tenant() for _ in range(4)]
        for tenant_id in others:
            await payments.save_card(tenant_id, CARD_OK)
        await timed_top_ups([payments], others)  # connections and caches warm
        before = await timed_top_ups([payments], others)

        proxy.hang(HANG_S, "POST", INTENTS, times=100, customer=stuck_customer)
        sent = proxy.forwarded(INTENTS, "POST")
        stalled = asyncio.create_task(timed_top_ups([payments], [stuck]))
        await proxy.async_wait_until_forwarded(INTENTS, "POST", sent + 1, 30)  # it hangs now
        during = await timed_top_ups([payments], others)
        await stalled
        proxy.clear_faults()

    succeeded = account_pb2.CHARGE_STATUS_SUCCEEDED
    granted_before = sum(status == succeeded for status, _ in before)
    granted_during = sum(status == succeeded for status, _ in during)
    assert (granted_before, granted_during) == (len(others), len(others))
    slowdown = statistics.median(s for _, s in during) / statistics.median(s for _, s in before)
    # One server on shared cores: the others' charges run beside the hanging one, so their
    # top-ups take about as long as without it (a worker that queues behind the hang takes
    # several times HANG_S longer).
    assert slowdown < 3, f"the others' top-ups took {slowdown:.1f} times as long"
