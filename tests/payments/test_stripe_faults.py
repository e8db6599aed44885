"""Exactly one PaymentIntent and one ledger credit per top-up, whatever the network and Stripe
do: lost answers, 500s, 429s, slow answers, and a server killed (SIGKILL) mid-charge.

The server talks to localstripe through StripeFaultProxy, which replays by Idempotency-Key as
Stripe does and injects the faults.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import stripe

from billing.v1 import account_pb2, account_pb2_grpc, admin_pb2, admin_pb2_grpc
from billing_service.domain.payments import ChargeStatus
from billing_service.storage.audit import audit_ledger
from billing_service.storage.database import create_engine
from tests.payments.conftest import CARD_OK, Payments, new_id, serving
from tests.support.clock import FakeClock
from tests.support.localstripe import API_KEY, LocalStripe
from tests.support.server_process import ServerProcess
from tests.support.stripe_proxy import StripeFaultProxy

INTENTS = "/v1/payment_intents"


@pytest.fixture
def proxy(localstripe: LocalStripe) -> Iterator[StripeFaultProxy]:
    with StripeFaultProxy(localstripe.url) as proxy:
        yield proxy


def intents_of(client: stripe.StripeClient, customer_id: str) -> list[str]:
    # localstripe cannot filter the list by customer.
    listed = client.v1.payment_intents.list({"limit": 100}).auto_paging_iter()
    return [intent.id for intent in listed if intent.customer == customer_id]


async def top_up(payments: Payments, tenant_id: str, deadline_s: float) -> account_pb2.Charge:
    answer = await payments.account.TopUpNow(
        account_pb2.TopUpNowRequest(
            request_id=new_id("topup"), tenant_id=tenant_id, amount_micros=10_000_000
        ),
        timeout=deadline_s,
    )
    return answer.charge


async def test_lost_answers_500s_429s_and_delays_charge_once(
    database_url: str, localstripe: LocalStripe, proxy: StripeFaultProxy
) -> None:
    async with serving(database_url, proxy.url, localstripe) as payments:
        tenant_id = await payments.create_tenant()
        saved = await payments.save_card(tenant_id, CARD_OK)
        proxy.drop_response_after_forwarding("POST", INTENTS)
        proxy.status_500("POST", INTENTS)
        proxy.status_429("POST", INTENTS)
        proxy.delay(0.5, "POST", INTENTS)

        charge = await top_up(payments, tenant_id, deadline_s=60)

        assert charge.status == account_pb2.CHARGE_STATUS_SUCCEEDED
        assert proxy.forwarded(INTENTS, "POST") == 1
        assert proxy.replayed(INTENTS, "POST") == 1
        assert intents_of(payments.stripe, saved.stripe_customer_id) == [charge.payment_intent_id]
        tenant = await payments.admin.GetTenant(admin_pb2.GetTenantRequest(tenant_id=tenant_id))
        assert tenant.tenant.balance.balance_micros == 10_000_000


async def test_a_charge_left_pending_by_a_long_outage_completes_once_later(
    database_url: str, localstripe: LocalStripe, proxy: StripeFaultProxy
) -> None:
    clock = FakeClock()
    async with serving(database_url, proxy.url, localstripe, clock) as payments:
        tenant_id = await payments.create_tenant()
        saved = await payments.save_card(tenant_id, CARD_OK)
        proxy.drop_response_after_forwarding("POST", INTENTS)
        proxy.status_500("POST", INTENTS, times=10)

        pending = await top_up(payments, tenant_id, deadline_s=8)

        assert pending.status == account_pb2.CHARGE_STATUS_PENDING
        assert (await payments.charges(tenant_id))[0].status is ChargeStatus.PENDING
        proxy.clear_faults()
        clock.advance(seconds=120)  # past the lease of the worker that gave up
        settled = await payments.settle_top_ups(tenant_id)

        assert settled.status is ChargeStatus.SUCCEEDED
        assert proxy.forwarded(INTENTS, "POST") == 1
        assert intents_of(payments.stripe, saved.stripe_customer_id) == [settled.payment_intent_id]
        tenant = await payments.admin.GetTenant(admin_pb2.GetTenantRequest(tenant_id=tenant_id))
        assert tenant.tenant.balance.balance_micros == 10_000_000


async def test_a_server_killed_mid_charge_charges_once_after_restart(
    tmp_path: Path, localstripe: LocalStripe, proxy: StripeFaultProxy
) -> None:
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"
    settings = {
        "BILLING_DATABASE_URL": database_url,
        "BILLING_LISTEN_ADDRESS": "127.0.0.1:0",
        "BILLING_STRIPE_API_KEY": API_KEY,
        "BILLING_STRIPE_API_BASE": proxy.url,
        "BILLING_CHARGE_LEASE_S": "1",
        "BILLING_CHARGE_WORKER_INTERVAL_S": "0.2",
        "BILLING_LOG_FORMAT": "text",
    }
    first = ServerProcess(settings)
    try:
        async with grpc.aio.insecure_channel(first.address) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            account = account_pb2_grpc.AccountServiceStub(channel)
            tenant_id = new_id("tenant")
            await admin.CreateTenant(
                admin_pb2.CreateTenantRequest(request_id=new_id("create"), tenant_id=tenant_id)
            )
            payments = Payments(
                None,  # type: ignore[arg-type]
                stripe.StripeClient(API_KEY, base_addresses={"api": localstripe.url}),
                None,  # type: ignore[arg-type]
                admin,
                account,
            )
            saved = await payments.save_card(tenant_id, CARD_OK)
            proxy.hold("POST", INTENTS)
            answer = await account.TopUpNow(
                account_pb2.TopUpNowRequest(
                    request_id=new_id("topup"), tenant_id=tenant_id, amount_micros=10_000_000
                ),
                timeout=2.5,
            )
            charge_id = answer.charge.charge_id
            assert answer.charge.status == account_pb2.CHARGE_STATUS_PENDING
            await proxy.async_wait_until_held(30)  # Stripe charged; the answer is held
        first.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.process.wait, 30)
    finally:
        first.kill()
    proxy.release()

    with ServerProcess(settings) as second:
        await asyncio.to_thread(second.wait_for_log, rf"charge {charge_id} .*: succeeded", 60)
        async with grpc.aio.insecure_channel(second.address) as channel:
            account = account_pb2_grpc.AccountServiceStub(channel)
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            got = await account.GetCharge(
                account_pb2.GetChargeRequest(tenant_id=tenant_id, charge_id=charge_id)
            )
            tenant = await admin.GetTenant(admin_pb2.GetTenantRequest(tenant_id=tenant_id))

    assert got.charge.status == account_pb2.CHARGE_STATUS_SUCCEEDED
    assert tenant.tenant.balance.balance_micros == 10_000_000
    assert proxy.forwarded(INTENTS, "POST") == 1
    assert proxy.replayed(INTENTS, "POST") >= 1
    assert intents_of(payments.stripe, saved.stripe_customer_id) == [got.charge.payment_intent_id]
    engine = create_engine(database_url, pool_size=1)
    try:
        assert await audit_ledger(engine) == []
    finally:
        await engine.dispose()
