"""The typed client's reservation for a tenant out of credit but with a good card."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from billing.client import BillingClient
from billing.v1 import account_pb2, types_pb2
from billing_service.domain.payments import ChargeStatus, ChargeTrigger
from tests.e2e.conftest import METERED, serving
from tests.payments.conftest import CARD_OK, new_id
from tests.support.localstripe import LocalStripe


def reserve_and_commit(
    target: str, tenant_id: str, max_tokens: int = 300_000
) -> types_pb2.UsageRecord:
    # One attempt only: the top-up must finish within this call's own deadline.
    with (
        BillingClient(target, timeout_s=20.0, max_attempts=1) as client,
        client.reserve(
            tenant_id, "alice", METERED, input_tokens=1_000, max_tokens=max_tokens
        ) as hold,
    ):
        return hold.commit(input_tokens=1_000, output_tokens=100_000)


async def test_a_reservation_without_room_is_granted_after_an_on_demand_top_up(
    database_url: str, localstripe: LocalStripe
) -> None:
    async with serving(database_url, localstripe.url, localstripe.url) as stack:
        tenant_id = await stack.create_tenant(credit_limit_micros=1_000_000)
        await stack.save_card(tenant_id, CARD_OK)
        await stack.account.UpdateAutoTopUp(
            account_pb2.UpdateAutoTopUpRequest(
                request_id=new_id("auto"), tenant_id=tenant_id, threshold_micros=0
            )
        )
        # $1 of room; the hold is 1,000 input tokens at $2.50/Mtok + 300,000 output at $10/Mtok.
        assert (await stack.balance(tenant_id)).available_credit_micros == 1_000_000

        record = await asyncio.to_thread(reserve_and_commit, stack.target, tenant_id)

        [charge] = await stack.charges(tenant_id)
        money = await stack.balance(tenant_id)

    assert (charge.trigger, charge.status) == (ChargeTrigger.ON_DEMAND, ChargeStatus.SUCCEEDED)
    assert record.cost_micros == 2_500 + 1_000_000
    assert money.balance_micros == charge.amount_micros - record.charged_micros
    assert money.held_micros == 0


async def test_concurrent_reservations_without_room_share_one_on_demand_top_up(
    database_url: str, localstripe: LocalStripe
) -> None:
    async with serving(database_url, localstripe.url, localstripe.url) as stack:
        tenant_id = await stack.create_tenant(credit_limit_micros=1_000_000)
        await stack.save_card(tenant_id, CARD_OK)
        await stack.account.UpdateAutoTopUp(
            account_pb2.UpdateAutoTopUpRequest(
                request_id=new_id("auto"), tenant_id=tenant_id, threshold_micros=0
            )
        )
        calls = 8

        def one_call(_: int) -> types_pb2.UsageRecord:
            return reserve_and_commit(stack.target, tenant_id, max_tokens=200_000)

        # Each hold is ~$2: eight need one $20 top-up on top of the $1 limit, and fit in it.
        with ThreadPoolExecutor(calls) as pool:
            records = await asyncio.gather(
                *(
                    asyncio.get_running_loop().run_in_executor(pool, one_call, n)
                    for n in range(calls)
                )
            )

        charges = await stack.charges(tenant_id)
        money = await stack.balance(tenant_id)

    assert [(c.trigger, c.status) for c in charges] == [
        (ChargeTrigger.ON_DEMAND, ChargeStatus.SUCCEEDED)
    ]
    assert money.balance_micros == charges[0].amount_micros - sum(
        record.charged_micros for record in records
    )
    assert money.held_micros == 0
