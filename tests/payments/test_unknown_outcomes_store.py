"""Charges whose first answer from Stripe was lost, over the real store (SQLite and
PostgreSQL) with a Stripe stand-in that compares a repeated key's parameters as Stripe does:
what a retry sends, what happens once Stripe may have forgotten the key, leases and claims, and
one tenant's hanging calls beside the others'."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import update

from billing_service.domain.commands import UpdateTenant
from billing_service.domain.ledger import EntryKind
from billing_service.domain.model import TenantStatus
from billing_service.domain.payments import BillingStatus, Card, ChargeStatus, PaymentOutcome
from billing_service.payments.gateway import PaymentResult
from billing_service.payments.outbox import idempotency_key
from billing_service.storage.tables import charges
from tests.payments.test_outbox_and_sink import LEASE, World, world_on


@pytest.fixture
async def world(database_url: str) -> AsyncIterator[World]:
    async with world_on(database_url) as world:
        yield world


async def lost_first_answer(world: World) -> tuple[str, str]:
    """A tenant whose charge reached Stripe (which charged the card) without an answer."""
    tenant_id = await world.tenant_with_card()
    charge = await world.enqueue(tenant_id)
    world.stripe.lose_responses = 1
    await world.worker().run_once()
    assert await world.status(charge.charge_id) is ChargeStatus.PENDING
    assert len(world.stripe.by_id) == 1
    return tenant_id, charge.charge_id


async def test_a_retry_after_a_new_card_sends_exactly_the_first_request(world: World) -> None:
    tenant_id, charge_id = await lost_first_answer(world)
    await world.store.save_card(tenant_id, Card("pm_new", "visa", "1881", None), world.clock())

    world.clock.advance(minutes=5)
    await world.worker().run_once()

    assert await world.status(charge_id) is ChargeStatus.SUCCEEDED
    assert world.stripe.requests[idempotency_key(charge_id)]["payment_method"] == f"pm_{tenant_id}"
    assert (world.stripe.calls, len(world.stripe.by_id)) == (2, 1)
    assert await world.entries(tenant_id) == [(EntryKind.TOP_UP, 10_000_000)]


async def test_a_charge_that_may_have_been_made_is_never_failed_for_a_removed_card(
    world: World,
) -> None:
    tenant_id, charge_id = await lost_first_answer(world)
    await world.store.forget_card(tenant_id, None, world.clock())

    world.clock.advance(minutes=5)
    await world.worker().run_once()

    assert await world.status(charge_id) is ChargeStatus.SUCCEEDED
    assert await world.entries(tenant_id) == [(EntryKind.TOP_UP, 10_000_000)]


async def test_a_suspension_does_not_change_what_a_retry_sends(world: World) -> None:
    tenant_id, charge_id = await lost_first_answer(world)
    await world.ledger.update_tenant(
        UpdateTenant("suspend", tenant_id, status=TenantStatus.SUSPENDED), "fp", world.clock()
    )

    world.clock.advance(minutes=5)
    await world.worker().run_once()

    assert await world.status(charge_id) is ChargeStatus.SUCCEEDED
    assert await world.entries(tenant_id) == [(EntryKind.TOP_UP, 10_000_000)]


async def test_past_the_key_window_the_charge_is_found_at_stripe_not_sent_again(
    world: World,
) -> None:
    tenant_id, charge_id = await lost_first_answer(world)
    world.clock.advance(hours=21)
    world.stripe.forget_keys()

    await world.worker().run_once()

    assert await world.status(charge_id) is ChargeStatus.SUCCEEDED
    assert (world.stripe.calls, len(world.stripe.by_id)) == (1, 1)
    assert await world.entries(tenant_id) == [(EntryKind.TOP_UP, 10_000_000)]


async def test_past_the_key_window_a_charge_stripe_never_saw_fails_without_blame(
    world: World,
) -> None:
    tenant_id = await world.tenant_with_card()
    charge = await world.enqueue(tenant_id)
    async with world.engine.begin() as conn:  # sent once; the request never reached Stripe
        await conn.execute(
            update(charges)
            .where(charges.c.charge_id == charge.charge_id)
            .values(sent_at=world.clock(), attempts=1)
        )
    world.clock.advance(hours=21)

    await world.worker().run_once()

    failed = await world.store.get_charge(charge.charge_id)
    assert failed is not None
    assert failed.status is ChargeStatus.FAILED
    assert failed.failure_message is not None
    assert failed.failure_message.startswith("Not made")
    assert world.stripe.calls == 0
    profile = await world.store.get_profile(tenant_id)
    assert profile is not None
    assert profile.billing_status is BillingStatus.GOOD_STANDING


async def test_an_ambiguous_answer_from_stripe_is_left_to_an_operator_and_blocks_no_one(
    world: World,
) -> None:
    tenant_id, charge_id = await lost_first_answer(world)
    [(customer, _)] = world.stripe.by_id.values()
    world.stripe.by_id["pi_twin"] = (
        customer,
        PaymentResult(PaymentOutcome.SUCCEEDED, "pi_twin", None, 1000, "usd", charge_id),
    )
    world.clock.advance(hours=21)

    await world.worker().run_once()

    unresolved = await world.store.get_charge(charge_id)
    assert unresolved is not None
    assert unresolved.status is ChargeStatus.UNRESOLVED
    assert "2 PaymentIntents" in (unresolved.failure_message or "")
    assert await world.entries(tenant_id) == []
    assert (await world.store.charge_gauges()).unresolved >= 1
    # The tenant can top up again meanwhile.
    again = await world.enqueue(tenant_id)
    assert again.charge_id != charge_id


async def test_a_worker_whose_claim_was_taken_over_neither_sends_nor_records(
    world: World,
) -> None:
    tenant_id = await world.tenant_with_card()
    charge = await world.enqueue(tenant_id)
    [stale] = await world.store.claim_due(world.clock(), LEASE, 10)
    world.clock.advance(seconds=LEASE.total_seconds() + 1)
    [current] = await world.store.claim_due(world.clock(), LEASE, 10)
    now = world.clock()

    assert not await world.store.begin_attempt(charge.charge_id, stale.claim_token, now)
    assert not await world.store.retry_later(charge.charge_id, stale.claim_token, now, now)
    recorded = await world.store.record_outcome(
        charge.charge_id, ChargeStatus.SUCCEEDED, "pi_x", None, now, claim_token=stale.claim_token
    )
    assert not recorded.moved
    assert await world.store.begin_attempt(charge.charge_id, current.claim_token, now)
    assert await world.entries(tenant_id) == []


async def test_one_tenants_hanging_calls_do_not_hold_up_the_others(world: World) -> None:
    stuck = await world.tenant_with_card()
    stuck_charge = await world.enqueue(stuck)  # the oldest charge: claimed first
    others = [await world.tenant_with_card() for _ in range(3)]
    for tenant_id in others:
        await world.enqueue(tenant_id)
    world.stripe.hanging.add(f"cus_{stuck}")
    # A call is cut off at half the lease: one second here.
    worker = world.worker(lease=timedelta(seconds=2))

    async with asyncio.timeout(30):
        await worker.run_once()

    for tenant_id in others:
        assert await world.entries(tenant_id) == [(EntryKind.TOP_UP, 10_000_000)]
    assert await world.status(stuck_charge.charge_id) is ChargeStatus.PENDING
    assert await world.entries(stuck) == []
