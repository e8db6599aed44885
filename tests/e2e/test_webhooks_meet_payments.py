"""localstripe's own webhook deliveries and Stripe-signed events reaching the payments core
through the real endpoint: the ledger, billing status and decisions that follow."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from billing.v1 import account_pb2, billing_pb2, types_pb2, usage_pb2
from billing_service.storage.tables import stripe_events
from tests.e2e.conftest import (
    INCLUDED,
    METERED,
    SECRET,
    WEBHOOK_LOGGER,
    Stack,
    serving,
    watching,
)
from tests.payments.conftest import CARD_NEEDS_AUTHENTICATION, CARD_OK, new_id
from tests.support.localstripe import API_KEY, PUBLISHABLE_KEY, LocalStripe
from tests.support.stripe_proxy import StripeFaultProxy

TOP_UP = 10_000_000


def event(
    type_: str, obj: dict[str, Any], previous: dict[str, Any] | None = None
) -> dict[str, Any]:
    data: dict[str, Any] = {"object": obj}
    if previous is not None:
        data["previous_attributes"] = previous
    return {
        "id": f"evt_{uuid.uuid4().hex[:24]}",
        "object": "event",
        "api_version": "2024-06-20",
        "created": int(time.time()),
        "data": data,
        "livemode": False,
        "pending_webhooks": 1,
        "type": type_,
    }


async def reserve(stack: Stack, tenant_id: str, model: str) -> types_pb2.Decision:
    answer = await stack.billing.ReserveCredit(
        billing_pb2.ReserveCreditRequest(
            request_id=new_id("reserve"),
            tenant_id=tenant_id,
            user_id="user-1",
            model=model,
            amount_micros=1_000_000,
        ),
        timeout=30.0,
    )
    return answer.decision


async def top_up_ledger(stack: Stack, tenant_id: str) -> list[tuple[int, int, str]]:
    answer = await stack.usage.ListLedgerEntries(
        usage_pb2.ListLedgerEntriesRequest(
            tenant_id=tenant_id,
            kinds=[
                usage_pb2.LEDGER_ENTRY_KIND_TOP_UP,
                usage_pb2.LEDGER_ENTRY_KIND_TOP_UP_REVERSAL,
            ],
        )
    )
    # Oldest first, to read as a statement.
    return [
        (entry.kind, entry.balance_delta_micros, entry.payment_intent_id)
        for entry in sorted(answer.ledger_entries, key=lambda entry: entry.ledger_entry_id)
    ]


async def delivered_event(stack: Stack, emulator: LocalStripe, type_: str) -> dict[str, Any]:
    """The event of `type_` the endpoint recorded, as localstripe holds it."""
    async with stack.app.engine.connect() as conn:
        rows = await conn.execute(
            select(stripe_events.c.event_id).where(stripe_events.c.type == type_)
        )
        [event_id] = [row.event_id for row in rows]
    async with httpx.AsyncClient(timeout=10.0) as http:
        answer = await http.get(f"{emulator.url}/v1/events/{event_id}", auth=(API_KEY, ""))
    answer.raise_for_status()
    found: dict[str, Any] = answer.json()
    return found


async def authenticate(emulator: LocalStripe, payment_intent_id: str) -> None:
    """The card holder completes 3-D Secure on the product's page (Stripe.js's part)."""
    async with httpx.AsyncClient(timeout=10.0) as http:
        intent = await http.get(
            f"{emulator.url}/v1/payment_intents/{payment_intent_id}", auth=(API_KEY, "")
        )
        intent.raise_for_status()
        done = await http.post(
            f"{emulator.url}/v1/payment_intents/{payment_intent_id}/_authenticate",
            data={
                "client_secret": intent.json()["client_secret"],
                "success": "true",
                "key": PUBLISHABLE_KEY,
            },
        )
    done.raise_for_status()


@pytest.mark.parametrize("webhook_first", [False, True], ids=["worker-first", "webhook-first"])
async def test_a_top_up_delivered_by_localstripe_credits_once_and_later_events_apply_once(
    database_url: str, webhook_first: bool
) -> None:
    # A localstripe of its own: its webhook registrations cannot be undone.
    with LocalStripe() as emulator, StripeFaultProxy(emulator.url) as proxy:
        async with serving(database_url, proxy.url, emulator.url) as stack:
            emulator.register_webhook("billing", stack.webhook_url, SECRET)
            tenant_id = await stack.create_tenant()
            await stack.save_card(tenant_id, CARD_OK)

            with watching(WEBHOOK_LOGGER, "(payment_intent.succeeded) processed") as delivered:
                if webhook_first:
                    # Stripe charges, but its answer to the worker is held back until the
                    # webhook has recorded the success.
                    proxy.hold("POST", "/v1/payment_intents")
                topping_up = asyncio.create_task(stack.top_up_now(tenant_id, TOP_UP))
                if webhook_first:
                    await proxy.async_wait_until_held(30.0)
                    await delivered.wait()
                    assert (await stack.balance(tenant_id)).balance_micros == TOP_UP
                    proxy.release()
                charge = await topping_up
                await delivered.wait()

            assert charge.status == account_pb2.CHARGE_STATUS_SUCCEEDED
            intent_id = charge.payment_intent_id
            assert (await stack.balance(tenant_id)).balance_micros == TOP_UP
            assert await top_up_ledger(stack, tenant_id) == [
                (usage_pb2.LEDGER_ENTRY_KIND_TOP_UP, TOP_UP, intent_id)
            ]
            assert proxy.forwarded("/v1/payment_intents", "POST") == 1

            # Stripe delivers the same event again (signed anew): nothing changes.
            succeeded = await delivered_event(stack, emulator, "payment_intent.succeeded")
            assert succeeded["data"]["object"]["id"] == intent_id
            again = await stack.post_event(succeeded)
            assert (again.status_code, again.json()) == (200, {"outcome": "duplicate"})

            # A failure of the same intent arriving late changes nothing either.
            failed_intent = {
                **succeeded["data"]["object"],
                "status": "requires_payment_method",
                "last_payment_error": {
                    "code": "card_declined",
                    "message": "Your card was declined.",
                    "type": "card_error",
                },
            }
            late = await stack.post_event(event("payment_intent.payment_failed", failed_intent))
            assert late.status_code == 200
            assert (await stack.balance(tenant_id)).balance_micros == TOP_UP
            assert await top_up_ledger(stack, tenant_id) == [
                (usage_pb2.LEDGER_ENTRY_KIND_TOP_UP, TOP_UP, intent_id)
            ]
            got = await stack.account.GetCharge(
                account_pb2.GetChargeRequest(tenant_id=tenant_id, charge_id=charge.charge_id)
            )
            assert got.charge.status == account_pb2.CHARGE_STATUS_SUCCEEDED
            profile = await stack.profile(tenant_id)
            assert profile.billing_status == types_pb2.BILLING_STATUS_GOOD_STANDING
            assert (await reserve(stack, tenant_id, METERED)).allowed

            # A dispute of the top-up, delivered twice and then as a second event.
            dispute = {
                "id": f"dp_{uuid.uuid4().hex[:24]}",
                "object": "dispute",
                "amount": TOP_UP // 10_000,
                "charge": succeeded["data"]["object"].get("latest_charge") or "ch_unknown",
                "currency": "usd",
                "payment_intent": intent_id,
                "reason": "fraudulent",
                "status": "needs_response",
            }
            disputed = event("charge.dispute.created", dispute)
            answers = [
                await stack.post_event(disputed),
                await stack.post_event(disputed),
                await stack.post_event(event("charge.dispute.created", dispute)),
            ]
            assert [answer.status_code for answer in answers] == [200, 200, 200]

            profile = await stack.profile(tenant_id)
            assert profile.billing_status == types_pb2.BILLING_STATUS_DISPUTED
            assert await top_up_ledger(stack, tenant_id) == [
                (usage_pb2.LEDGER_ENTRY_KIND_TOP_UP, TOP_UP, intent_id),
                (usage_pb2.LEDGER_ENTRY_KIND_TOP_UP_REVERSAL, -TOP_UP, intent_id),
            ]
            held = (await stack.balance(tenant_id)).held_micros
            assert held == 1_000_000  # the metered hold granted above
            assert (await stack.balance(tenant_id)).balance_micros == 0
            denied = await reserve(stack, tenant_id, METERED)
            assert not denied.allowed
            assert denied.reason == types_pb2.DENIAL_REASON_PAYMENT_DISPUTED
            assert (await reserve(stack, tenant_id, INCLUDED)).allowed
            summary = await stack.usage.GetUsageSummary(
                usage_pb2.GetUsageSummaryRequest(tenant_id=tenant_id)
            )
            assert summary.billing_profile.billing_status == types_pb2.BILLING_STATUS_DISPUTED
            assert summary.tenant.billing_status == types_pb2.BILLING_STATUS_DISPUTED


async def test_a_signed_payment_method_detached_clears_the_card(
    database_url: str, localstripe: LocalStripe
) -> None:
    async with serving(database_url, localstripe.url, localstripe.url) as stack:
        tenant_id = await stack.create_tenant()
        saved = await stack.save_card(tenant_id, CARD_OK)
        assert (await reserve(stack, tenant_id, METERED)).allowed
        method = saved.payment_method
        detached = {
            "id": method.payment_method_id,
            "object": "payment_method",
            "billing_details": {"email": None, "name": None},
            "card": {"brand": method.brand, "last4": method.last4, "exp_year": 2034},
            "customer": None,
            "type": "card",
        }
        posted = event("payment_method.detached", detached, {"customer": saved.stripe_customer_id})

        answers = [await stack.post_event(posted), await stack.post_event(posted)]

        assert [answer.status_code for answer in answers] == [200, 200]
        assert not (await stack.profile(tenant_id)).HasField("payment_method")
        summary = await stack.usage.GetUsageSummary(
            usage_pb2.GetUsageSummaryRequest(tenant_id=tenant_id)
        )
        assert not summary.billing_profile.HasField("payment_method")
        assert (await stack.balance(tenant_id)).effective_credit_limit_micros == 0
        denied = await reserve(stack, tenant_id, METERED)
        assert not denied.allowed
        assert denied.reason == types_pb2.DENIAL_REASON_PAYMENT_METHOD_REQUIRED


async def test_signed_refunds_of_a_top_up_are_reversed_up_to_the_cumulative_amount(
    database_url: str, localstripe: LocalStripe
) -> None:
    async with serving(database_url, localstripe.url, localstripe.url) as stack:
        tenant_id = await stack.create_tenant()
        await stack.save_card(tenant_id, CARD_OK)
        charge = await stack.top_up_now(tenant_id, TOP_UP)
        intent_id = charge.payment_intent_id

        def refunded(cumulative_cents: int) -> dict[str, Any]:
            stripe_charge = {
                "id": "ch_of_" + intent_id,
                "object": "charge",
                "amount": TOP_UP // 10_000,
                "amount_refunded": cumulative_cents,
                "currency": "usd",
                "payment_intent": intent_id,
                "refunded": cumulative_cents == TOP_UP // 10_000,
                "status": "succeeded",
            }
            return event("charge.refunded", stripe_charge)

        # $2.50, then the rest ($10 in all); the first is redelivered after the second.
        partial, full = refunded(250), refunded(1_000)
        answers = [
            await stack.post_event(partial),
            await stack.post_event(full),
            await stack.post_event(partial),
            await stack.post_event(refunded(250)),
        ]

        assert [answer.status_code for answer in answers] == [200] * 4
        assert await top_up_ledger(stack, tenant_id) == [
            (usage_pb2.LEDGER_ENTRY_KIND_TOP_UP, TOP_UP, intent_id),
            (usage_pb2.LEDGER_ENTRY_KIND_TOP_UP_REVERSAL, -2_500_000, intent_id),
            (usage_pb2.LEDGER_ENTRY_KIND_TOP_UP_REVERSAL, -7_500_000, intent_id),
        ]
        assert (await stack.balance(tenant_id)).balance_micros == 0
        profile = await stack.profile(tenant_id)
        assert profile.billing_status == types_pb2.BILLING_STATUS_GOOD_STANDING


async def test_a_charge_the_card_holder_authenticates_is_credited_by_localstripes_webhook(
    database_url: str,
) -> None:
    with LocalStripe() as emulator:
        async with serving(database_url, emulator.url, emulator.url) as stack:
            emulator.register_webhook("billing", stack.webhook_url, SECRET)
            tenant_id = await stack.create_tenant()
            await stack.save_card(tenant_id, CARD_NEEDS_AUTHENTICATION)
            charge = await stack.top_up_now(tenant_id, TOP_UP)
            assert charge.status == account_pb2.CHARGE_STATUS_ACTION_REQUIRED
            assert (await stack.balance(tenant_id)).balance_micros == 0

            with watching(WEBHOOK_LOGGER, "(payment_intent.succeeded) processed") as delivered:
                await authenticate(emulator, charge.payment_intent_id)
                await delivered.wait()

            got = await stack.account.GetCharge(
                account_pb2.GetChargeRequest(tenant_id=tenant_id, charge_id=charge.charge_id)
            )
            assert got.charge.status == account_pb2.CHARGE_STATUS_SUCCEEDED
            profile = await stack.profile(tenant_id)
            assert profile.billing_status == types_pb2.BILLING_STATUS_GOOD_STANDING
            assert await top_up_ledger(stack, tenant_id) == [
                (usage_pb2.LEDGER_ENTRY_KIND_TOP_UP, TOP_UP, charge.payment_intent_id)
            ]
            assert (await reserve(stack, tenant_id, METERED)).allowed
