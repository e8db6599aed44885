"""The ceiling's rules in the store, with a server-wide default ceiling and a Stripe stand-in:
concurrent workers, refunds, and a charge that straddles the month boundary."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select, update

from billing_service.domain.ledger import EntryKind
from billing_service.domain.money import AMOUNT_MICROS_MAX
from billing_service.domain.page_tokens import PageTokens
from billing_service.domain.payments import AutoTopUp, Card, ChargeStatus, PaymentOutcome
from billing_service.payments.account import AccountCore
from billing_service.payments.events import PaymentIntentFacts
from billing_service.payments.outbox import new_charge_id
from billing_service.payments.sink import PaymentsEventSink
from billing_service.storage.charge_sql import charge_from_row
from billing_service.storage.charge_store import credit_top_up
from billing_service.storage.database import transaction
from billing_service.storage.tables import charges
from tests.payments.test_outbox_and_sink import World, world_on
from tests.support.postgres import until_a_session_waits_for_a_lock

TOP_UP = 5_000_000
CEILING = 10_000_000
START = datetime(2026, 11, 30, 23, 0, tzinfo=UTC)


@pytest.fixture
async def world(database_url: str) -> AsyncIterator[World]:
    # Every tenant is under this threshold: each worker round wants a top-up.
    defaults = AutoTopUp(True, 1_000_000_000, TOP_UP, CEILING)
    async with world_on(database_url, defaults, START, pool_size=10) as world:
        yield world


async def test_concurrent_workers_never_pass_the_ceiling_together(world: World) -> None:
    tenant_id = await world.tenant_with_card()

    for _ in range(3):
        await asyncio.gather(*(world.worker().run_once() for _ in range(8)))

    assert await world.entries(tenant_id) == [(EntryKind.TOP_UP, TOP_UP)] * 2
    assert len(world.stripe.intents) == 2
    assert await world.store.tenants_due_for_top_up(100, world.clock()) == []
    profile = await world.store.get_profile(tenant_id, world.clock())
    assert profile is not None
    assert profile.auto_top_up.monthly_limit_micros == CEILING
    assert profile.automatic_top_ups_this_month_micros == CEILING


async def test_a_refund_gives_no_room_back(world: World) -> None:
    tenant_id = await world.tenant_with_card()
    await world.worker().run_once()
    [first] = await world.store.charges_of(tenant_id)
    assert first.payment_intent_id is not None

    await world.store.reverse_top_up(first.payment_intent_id, None, world.clock())
    await world.worker().run_once()
    await world.worker().run_once()

    assert await world.entries(tenant_id) == [
        (EntryKind.TOP_UP, TOP_UP),
        (EntryKind.TOP_UP_REVERSAL, -TOP_UP),
        (EntryKind.TOP_UP, TOP_UP),
    ]
    assert not await world.store.enqueue_automatic(tenant_id, new_charge_id(), world.clock())
    assert await world.store.ceiling_blocks_top_up(tenant_id, world.clock())


async def test_a_charge_counts_in_the_month_it_was_made_pending_or_not(world: World) -> None:
    tenant_id = await world.tenant_with_card()
    await world.worker().run_once()  # November: $5 of $10
    assert await world.store.enqueue_automatic(tenant_id, new_charge_id(), world.clock())
    # In flight, the second $5 already fills November: an on-demand $5 more, for a hold the
    # tenant's credit does not cover, would not fit.
    assert await world.store.ceiling_blocks_top_up(
        tenant_id, world.clock(), at_least_micros=1, hold_micros=AMOUNT_MICROS_MAX
    )

    world.clock.now = datetime(2026, 12, 1, 0, 0, tzinfo=UTC)
    await world.worker().run_once()  # sends November's second one
    await world.worker().run_once()  # December's room: two more
    await world.worker().run_once()
    await world.worker().run_once()  # and no more

    charges = await world.store.charges_of(tenant_id)
    assert [c.status for c in charges] == [ChargeStatus.SUCCEEDED] * 4
    assert [c.created_at.month for c in charges] == [11, 11, 12, 12]
    profile = await world.store.get_profile(tenant_id, world.clock())
    assert profile is not None
    assert profile.automatic_top_ups_this_month_micros == 2 * TOP_UP


async def test_a_charge_parked_for_authentication_counts_in_its_month_until_it_fails(
    world: World,
) -> None:
    tenant_id = await world.tenant_with_card()
    world.stripe.outcome = PaymentOutcome.REQUIRES_ACTION
    await world.worker().run_once()  # November 30: $5 waiting for the card holder
    [parked] = await world.store.charges_of(tenant_id)
    assert parked.status is ChargeStatus.ACTION_REQUIRED
    world.stripe.outcome = PaymentOutcome.SUCCEEDED
    await world.store.save_card(tenant_id, Card("pm_new", "visa", "1881", None), world.clock())
    world.clock.advance(seconds=1)

    for _ in range(3):
        await world.worker().run_once()
    # The parked $5 may still be authenticated: one more $5 fits November.
    assert len(await world.store.charges_of(tenant_id)) == 2
    world.clock.now = datetime(2026, 12, 1, 0, 0, tzinfo=UTC)
    sink = PaymentsEventSink(
        world.store,
        AccountCore(world.store, None, world.clock, PageTokens.random()),
        None,
        world.clock,
    )
    assert parked.payment_intent_id is not None
    await sink.payment_intent_succeeded(
        PaymentIntentFacts(
            parked.payment_intent_id, None, TOP_UP // 10_000, parked.charge_id, None, world.clock()
        )
    )
    for _ in range(3):
        await world.worker().run_once()

    charges = await world.store.charges_of(tenant_id)
    assert [(c.created_at.month, c.status) for c in charges] == [
        (11, ChargeStatus.SUCCEEDED),
        (11, ChargeStatus.SUCCEEDED),
        (12, ChargeStatus.SUCCEEDED),
        (12, ChargeStatus.SUCCEEDED),
    ]
    profile = await world.store.get_profile(tenant_id, world.clock())
    assert profile is not None
    assert profile.automatic_top_ups_this_month_micros == 2 * TOP_UP


async def test_only_the_tenants_own_manual_top_up_resumes_its_automatic_ones(world: World) -> None:
    capped, other = await world.tenant_with_card(), await world.tenant_with_card()
    await world.store.update_auto_top_up(
        other, False, None, None, world.clock(), monthly_limit_micros=0
    )
    for _ in range(3):
        await world.worker().run_once()
    assert await world.entries(capped) == [(EntryKind.TOP_UP, TOP_UP)] * 2

    await world.enqueue(other, 1_000_000)  # a manual top-up of another tenant
    await world.worker().run_once()
    assert await world.entries(other) == [(EntryKind.TOP_UP, 1_000_000)]
    assert await world.store.ceiling_blocks_top_up(capped, world.clock())

    world.clock.advance(seconds=1)
    await world.enqueue(capped, 1_000_000)  # the tenant's own
    await world.worker().run_once()
    world.clock.advance(seconds=1)
    await world.worker().run_once()
    await world.worker().run_once()
    assert (
        await world.entries(capped)
        == [(EntryKind.TOP_UP, TOP_UP)] * 2
        + [(EntryKind.TOP_UP, 1_000_000)]
        + [(EntryKind.TOP_UP, TOP_UP)] * 2
    )


async def test_an_on_demand_top_up_is_made_only_while_the_hold_still_has_no_room(
    world: World,
) -> None:
    """The store decides it in the statement that writes the charge: a hold that fits the
    tenant's credit by now (to the micro) gets no charge; one micro more does."""
    fits, short = await world.tenant_with_card(), await world.tenant_with_card()
    account = await world.store.get_account(fits)
    assert account is not None
    room = account.available_micros
    assert room > 0

    assert not await world.store.enqueue_automatic(
        fits, new_charge_id(), world.clock(), at_least_micros=1, hold_micros=room
    )
    assert await world.store.pending_charge(fits) is None
    assert await world.store.enqueue_automatic(
        short, new_charge_id(), world.clock(), at_least_micros=1, hold_micros=room + 1
    )
    pending = await world.store.pending_charge(short)
    assert pending is not None
    assert pending.amount_micros == TOP_UP


async def test_an_on_demand_top_up_decided_while_a_charge_lands_sees_its_credit(
    world: World,
) -> None:
    """PostgreSQL, read committed: the statement that writes a charge must decide on the
    tenant row as it is once the charge landing at that moment commits, not on the snapshot
    taken before (where the landing charge still looked pending and the credit absent)."""
    if world.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer: no charge lands while a statement runs")
    tenant_id = await world.tenant_with_card()
    account = await world.store.get_account(tenant_id)
    assert account is not None
    hold = account.available_micros + 1
    assert await world.store.enqueue_automatic(
        tenant_id, new_charge_id(), world.clock(), at_least_micros=1, hold_micros=hold
    )
    first = await world.store.pending_charge(tenant_id)
    assert first is not None

    async with transaction(world.engine) as conn:  # the worker recording its success
        landed = (
            await conn.execute(
                update(charges)
                .where(charges.c.charge_id == first.charge_id)
                .values(status=ChargeStatus.SUCCEEDED, updated_at=world.clock())
                .returning(*charges.c)
            )
        ).one()
        await credit_top_up(conn, charge_from_row(landed), world.clock())
        second = asyncio.create_task(
            world.store.enqueue_automatic(
                tenant_id, new_charge_id(), world.clock(), at_least_micros=1, hold_micros=hold
            )
        )
        await until_a_session_waits_for_a_lock(world.engine)

    assert not await second
    async with world.engine.connect() as conn:
        made = await conn.execute(
            select(func.count()).select_from(charges).where(charges.c.tenant_id == tenant_id)
        )
        assert made.scalar_one() == 1
    assert await world.balance(tenant_id) == TOP_UP
