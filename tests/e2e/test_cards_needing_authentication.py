"""Automatic and on-demand top-ups on a card that needs its holder's authentication
(4000002500003155): nothing is credited, the tenant is told what to do, metered models are
denied until then and included ones keep working."""

from __future__ import annotations

from billing.v1 import account_pb2, billing_pb2, types_pb2
from billing_service.domain.payments import ChargeStatus, ChargeTrigger
from tests.e2e.conftest import INCLUDED, METERED, Stack, serving
from tests.payments.conftest import CARD_NEEDS_AUTHENTICATION, new_id
from tests.support.localstripe import LocalStripe


async def reserve(
    stack: Stack, tenant_id: str, model: str, amount_micros: int
) -> types_pb2.Decision:
    answer = await stack.billing.ReserveCredit(
        billing_pb2.ReserveCreditRequest(
            request_id=new_id("reserve"),
            tenant_id=tenant_id,
            user_id="user-1",
            model=model,
            amount_micros=amount_micros,
        ),
        timeout=30.0,
    )
    return answer.decision


async def assert_waiting_for_the_card_holder(stack: Stack, tenant_id: str) -> None:
    profile = await stack.profile(tenant_id)
    assert profile.billing_status == types_pb2.BILLING_STATUS_ACTION_REQUIRED
    assert profile.billing_status_message
    denied = await reserve(stack, tenant_id, METERED, 1_000)
    assert not denied.allowed
    assert denied.reason == types_pb2.DENIAL_REASON_PAYMENT_ACTION_REQUIRED
    assert denied.message
    assert (await reserve(stack, tenant_id, INCLUDED, 1_000)).allowed


async def test_an_automatic_top_up_needing_authentication(
    database_url: str, localstripe: LocalStripe
) -> None:
    async with serving(database_url, localstripe.url, localstripe.url) as stack:
        tenant_id = await stack.create_tenant()
        await stack.save_card(tenant_id, CARD_NEEDS_AUTHENTICATION)

        # $25 limit - $21 held leaves $4, under the default $5 threshold.
        assert (await reserve(stack, tenant_id, METERED, 21_000_000)).allowed
        charge = await stack.settle_top_ups(tenant_id)

        assert (charge.trigger, charge.status) == (
            ChargeTrigger.AUTOMATIC,
            ChargeStatus.ACTION_REQUIRED,
        )
        money = await stack.balance(tenant_id)
        assert (money.balance_micros, money.held_micros) == (0, 21_000_000)
        await assert_waiting_for_the_card_holder(stack, tenant_id)
        await stack.settle_top_ups(tenant_id)
        assert len(await stack.charges(tenant_id)) == 1  # not retried behind the holder's back


async def test_an_on_demand_top_up_needing_authentication_denies_the_reservation(
    database_url: str, localstripe: LocalStripe
) -> None:
    async with serving(database_url, localstripe.url, localstripe.url) as stack:
        tenant_id = await stack.create_tenant(credit_limit_micros=1_000_000)
        await stack.save_card(tenant_id, CARD_NEEDS_AUTHENTICATION)
        await stack.account.UpdateAutoTopUp(
            account_pb2.UpdateAutoTopUpRequest(
                request_id=new_id("auto"), tenant_id=tenant_id, threshold_micros=0
            )
        )

        decision = await reserve(stack, tenant_id, METERED, 3_000_000)

        assert not decision.allowed
        assert decision.reason == types_pb2.DENIAL_REASON_PAYMENT_ACTION_REQUIRED
        [charge] = await stack.charges(tenant_id)
        assert (charge.trigger, charge.status) == (
            ChargeTrigger.ON_DEMAND,
            ChargeStatus.ACTION_REQUIRED,
        )
        money = await stack.balance(tenant_id)
        assert (money.balance_micros, money.held_micros) == (0, 0)
        await assert_waiting_for_the_card_holder(stack, tenant_id)
