"""Charges the worker cannot resolve on its own, and the operator who resolves them: listed,
counted in the metrics, resolved through AdminService and billingctl, each resolution checked
against Stripe (localstripe behind the replaying proxy) and recorded once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from billing.v1 import account_pb2, admin_pb2
from billing_service.domain.payments import BillingStatus, ChargeStatus
from tests.ctl.conftest import Result, run_ctl
from tests.payments.conftest import (
    CARD_DECLINED_OFF_SESSION,
    CARD_OK,
    Payments,
    new_id,
    serving,
)
from tests.payments.test_cards_and_charges import top_up_now
from tests.support.clock import FakeClock
from tests.support.grpc_errors import rich_error
from tests.support.localstripe import LocalStripe
from tests.support.metric_names import CHARGE_METRICS, exported_metric_names
from tests.support.stripe_proxy import StripeFaultProxy

INTENTS = "/v1/payment_intents"
AMOUNT = 5_000_000


@pytest.fixture
def proxy(localstripe: LocalStripe) -> Iterator[StripeFaultProxy]:
    with StripeFaultProxy(localstripe.url) as proxy:
        yield proxy


@dataclass
class Desk:
    payments: Payments
    proxy: StripeFaultProxy
    clock: FakeClock

    async def metric(self, name: str, **labels: str) -> float:
        await self.payments.app.readiness.check()
        value = self.payments.app.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def unresolved_charge(self, card: str) -> tuple[str, str, str]:
        """A TopUpNow whose answer was lost, a second PaymentIntent for the same charge made
        at Stripe meanwhile, and a day gone by: Stripe's answer is ambiguous."""
        payments = self.payments
        tenant_id = await payments.create_tenant()
        saved = await payments.save_card(tenant_id, card)
        self.proxy.drop_response_after_forwarding(
            "POST", INTENTS, times=10, customer=saved.stripe_customer_id
        )
        charge = (
            await payments.account.TopUpNow(
                account_pb2.TopUpNowRequest(
                    request_id=new_id("topup"), tenant_id=tenant_id, amount_micros=AMOUNT
                ),
                timeout=3,
            )
        ).charge
        worker = payments.app.charge_worker
        assert worker is not None
        await worker.run_once()  # whoever sent it, its attempt is over
        assert (await payments.charges(tenant_id))[0].status is ChargeStatus.PENDING
        self.proxy.clear_faults()
        twin = await asyncio.to_thread(
            _twin_intent,
            payments,
            saved.stripe_customer_id,
            saved.payment_method.payment_method_id,
            charge.charge_id,
        )
        self.clock.advance(hours=21)
        self.proxy.forget_keys()
        await worker.run_once()
        return tenant_id, charge.charge_id, twin


def _twin_intent(payments: Payments, customer: str, card: str, charge_id: str) -> str:
    """A second PaymentIntent naming the charge, confirmed like the first."""
    try:
        intent = payments.stripe.v1.payment_intents.create(
            {
                "amount": AMOUNT // 10_000,
                "currency": "usd",
                "customer": customer,
                "payment_method": card,
                "confirm": True,
                "off_session": True,
                "metadata": {"charge_id": charge_id},
            }
        )
        return str(intent.id)
    except Exception:  # a declined twin: its id is in Stripe's list
        listed = payments.stripe.v1.payment_intents.list({"limit": 100}).auto_paging_iter()
        twins = [
            i.id
            for i in listed
            if i.customer == customer and i.metadata.to_dict().get("charge_id") == charge_id
        ]
        return str(twins[-1])


@pytest.fixture
async def desk(
    database_url: str, localstripe: LocalStripe, proxy: StripeFaultProxy
) -> AsyncIterator[Desk]:
    clock = FakeClock()
    async with serving(database_url, proxy.url, localstripe, clock, charge_lease_s=4) as payments:
        yield Desk(payments, proxy, clock)


async def resolve(
    desk: Desk,
    charge_id: str,
    outcome: int,
    payment_intent_id: str = "",
    request_id: str | None = None,
    reason: str = "ticket 4412",
) -> admin_pb2.ResolveChargeResponse:
    return await desk.payments.admin.ResolveCharge(
        admin_pb2.ResolveChargeRequest(
            request_id=request_id or new_id("resolve"),
            charge_id=charge_id,
            outcome=outcome,
            payment_intent_id=payment_intent_id,
            reason=reason,
        )
    )


async def refused(
    desk: Desk, charge_id: str, outcome: int, **fields: str
) -> tuple[grpc.StatusCode, str, list[str]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(desk, charge_id, outcome, **fields)
    error = rich_error(caught.value)
    return error.code, error.reason, error.fields


async def test_an_ambiguous_charge_is_listed_counted_and_resolved_once_as_stripe_says(
    desk: Desk,
) -> None:
    tenant_id, charge_id, twin = await desk.unresolved_charge(CARD_OK)
    payments = desk.payments
    listed = await payments.admin.ListCharges(
        admin_pb2.ListChargesRequest(status=account_pb2.CHARGE_STATUS_UNRESOLVED)
    )
    assert [c.charge_id for c in listed.charges] == [charge_id]
    assert "2 PaymentIntents" in listed.charges[0].failure_message
    assert await desk.metric("billing_charges_needing_operator") == 1
    assert await desk.metric("billing_charges_pending") == 1
    assert await desk.metric("billing_charges_total", trigger="manual", outcome="unknown") >= 2
    # Both PaymentIntents took the money: neither "failed" nor "the only success" is true.
    succeeded = admin_pb2.CHARGE_RESOLUTION_SUCCEEDED
    failed = admin_pb2.CHARGE_RESOLUTION_FAILED
    contradicts = (grpc.StatusCode.FAILED_PRECONDITION, "CHARGE_OUTCOME_CONTRADICTS_STRIPE", [])
    assert await refused(desk, charge_id, failed) == contradicts
    assert await refused(desk, charge_id, succeeded) == contradicts
    assert await refused(desk, charge_id, succeeded, payment_intent_id="pi_unknown") == contradicts

    request_id = new_id("resolve")
    first = await resolve(desk, charge_id, succeeded, twin, request_id)
    again = await resolve(desk, charge_id, succeeded, twin, request_id)

    assert first.charge.status == again.charge.status == account_pb2.CHARGE_STATUS_SUCCEEDED
    assert first.charge.payment_intent_id == twin
    tenant = await payments.admin.GetTenant(admin_pb2.GetTenantRequest(tenant_id=tenant_id))
    assert tenant.tenant.balance.balance_micros == AMOUNT
    assert await refused(desk, charge_id, failed) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "CHARGE_ALREADY_FINAL",
        [],
    )
    assert await refused(desk, charge_id, failed, request_id=request_id) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
        [],
    )
    assert await desk.metric("billing_charges_needing_operator") == 0
    assert await desk.metric("billing_charges_total", trigger="manual", outcome="succeeded") == 1


async def test_a_charge_stripe_declined_twice_is_resolved_as_failed_with_billingctl(
    desk: Desk,
) -> None:
    tenant_id, charge_id, _ = await desk.unresolved_charge(CARD_DECLINED_OFF_SESSION)
    payments = desk.payments

    async def ctl(*args: str) -> Result:
        target = f"127.0.0.1:{payments.app.port}"
        return await asyncio.to_thread(run_ctl, "--target", target, *args)

    listed = await ctl("charges", "list", "--status", "unresolved", "--tenant", tenant_id)
    wrong = await ctl(
        "charges", "resolve", charge_id, "--outcome", "succeeded", "--reason", "ticket 1"
    )
    done = await ctl(
        "charges", "resolve", charge_id, "--outcome", "failed", "--reason", "ticket 1", "--json"
    )

    assert listed.code == 0, listed.stderr
    assert charge_id in listed.stdout
    assert "unresolved" in listed.stdout
    assert wrong.code == 64 + grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "CHARGE_OUTCOME_CONTRADICTS_STRIPE" in wrong.stderr
    assert done.code == 0, done.stderr
    assert done.json()["charge"]["status"] == "CHARGE_STATUS_FAILED"
    [charge] = await payments.charges(tenant_id)
    assert charge.status is ChargeStatus.FAILED
    assert (charge.failure_message or "").endswith("ticket 1")
    profile = await payments.app.account.store.get_profile(tenant_id)  # type: ignore[union-attr]
    assert profile is not None
    assert (
        profile.billing_status is BillingStatus.GOOD_STANDING
    )  # the operator's word blames no one
    tenant = await payments.admin.GetTenant(admin_pb2.GetTenantRequest(tenant_id=tenant_id))
    assert tenant.tenant.balance.balance_micros == 0


async def test_resolutions_that_cannot_be_right_change_nothing(desk: Desk) -> None:
    payments = desk.payments
    tenant_id = await payments.create_tenant()
    await payments.save_card(tenant_id, CARD_OK)
    charge = await top_up_now(payments, tenant_id, AMOUNT)
    assert charge.status == account_pb2.CHARGE_STATUS_SUCCEEDED
    succeeded = admin_pb2.CHARGE_RESOLUTION_SUCCEEDED
    invalid = grpc.StatusCode.INVALID_ARGUMENT

    assert await refused(desk, charge.charge_id, admin_pb2.CHARGE_RESOLUTION_UNSPECIFIED) == (
        invalid,
        "FIELD_INVALID",
        ["outcome"],
    )
    assert await refused(desk, "chg_nope", succeeded) == (invalid, "FIELD_INVALID", ["charge_id"])
    assert await refused(desk, charge.charge_id, succeeded, reason=" ") == (
        invalid,
        "FIELD_INVALID",
        ["reason"],
    )
    assert await refused(desk, charge.charge_id, succeeded, payment_intent_id="ch_1") == (
        invalid,
        "FIELD_INVALID",
        ["payment_intent_id"],
    )
    assert await refused(desk, "chg_" + "0" * 32, succeeded) == (
        grpc.StatusCode.NOT_FOUND,
        "CHARGE_NOT_FOUND",
        [],
    )
    assert await refused(desk, charge.charge_id, succeeded) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "CHARGE_ALREADY_FINAL",
        [],
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await payments.admin.ListCharges(admin_pb2.ListChargesRequest(status=99))
    assert rich_error(caught.value).fields == ["status"]
    tenant = await payments.admin.GetTenant(admin_pb2.GetTenantRequest(tenant_id=tenant_id))
    assert tenant.tenant.balance.balance_micros == AMOUNT


async def test_charges_are_listed_a_page_at_a_time(desk: Desk) -> None:
    payments = desk.payments
    tenant_id = await payments.create_tenant()
    await payments.save_card(tenant_id, CARD_OK)
    made = []
    for _ in range(3):
        desk.clock.advance(seconds=1)
        made.append((await top_up_now(payments, tenant_id, AMOUNT)).charge_id)

    pages, token = [], ""
    while True:
        page = await payments.admin.ListCharges(
            admin_pb2.ListChargesRequest(tenant_id=tenant_id, page_size=2, page_token=token)
        )
        pages.append([c.charge_id for c in page.charges])
        token = page.next_page_token
        if not token:
            break
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await payments.admin.ListCharges(
            admin_pb2.ListChargesRequest(page_size=2, page_token="bm90IGEgdG9rZW4")
        )

    assert pages == [made[:2], made[2:]]
    assert rich_error(caught.value).fields == ["page_token"]


def test_the_charge_metrics_the_alerts_read_are_exported(tmp_path: Path) -> None:
    assert exported_metric_names(tmp_path) >= CHARGE_METRICS
