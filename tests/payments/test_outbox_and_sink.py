"""Exactly-once charging and webhook facts, over the real store (SQLite and PostgreSQL) with a
Stripe stand-in that replays by idempotency key as Stripe does (localstripe does not)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_service.domain.commands import CreateTenant, UpdateTenant
from billing_service.domain.ledger import EntryKind
from billing_service.domain.page_tokens import PageTokens
from billing_service.domain.payments import (
    AutoTopUp,
    BillingStatus,
    Card,
    Charge,
    ChargeStatus,
    ChargeTrigger,
    PaymentOutcome,
)
from billing_service.payments.account import AccountCore
from billing_service.payments.events import PaymentIntentFacts
from billing_service.payments.gateway import GatewayRefused, GatewayUnavailable, PaymentResult
from billing_service.payments.outbox import ChargeWorker, new_charge_id
from billing_service.payments.sink import PaymentsEventSink
from billing_service.storage.audit import audit_ledger
from billing_service.storage.database import create_engine
from billing_service.storage.ledger_store import LedgerStore
from billing_service.storage.migrations import migrate
from billing_service.storage.payments_store import PaymentsStore
from billing_service.storage.tables import charges, ledger_entries
from tests.support.clock import FakeClock

START = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(seconds=60)
DEFAULTS = AutoTopUp(True, 5_000_000, 20_000_000)
_tenants = itertools.count()


@dataclass
class FakeStripe:
    """Charges by idempotency key as Stripe does: a key seen before with the same parameters
    replays its first PaymentIntent; with other parameters it is refused."""

    outcome: PaymentOutcome = PaymentOutcome.SUCCEEDED
    lose_responses: int = 0  # the next N answers are lost after Stripe charged
    gate: asyncio.Event | None = None  # holds each answer until set
    # Customers whose calls never answer (until the caller gives up).
    hanging: set[str] = field(default_factory=set)
    charged: asyncio.Event = field(default_factory=asyncio.Event)
    intents: dict[str, PaymentResult] = field(default_factory=dict)  # by key
    requests: dict[str, dict[str, Any]] = field(default_factory=dict)  # by key
    by_id: dict[str, tuple[str, PaymentResult]] = field(default_factory=dict)  # customer, intent
    calls: int = 0

    async def charge(
        self,
        *,
        customer_id: str,
        payment_method_id: str,
        amount_cents: int,
        currency: str,
        charge_id: str,
        idempotency_key: str,
    ) -> PaymentResult:
        self.calls += 1
        request = {
            "customer": customer_id,
            "payment_method": payment_method_id,
            "amount": amount_cents,
            "currency": currency,
            "charge_id": charge_id,
        }
        if self.requests.setdefault(idempotency_key, request) != request:
            raise GatewayRefused(
                "Keys for idempotent requests can only be used with the same parameters"
            )
        if idempotency_key not in self.intents:
            number = len(self.by_id) + 1
            message = None if self.outcome is PaymentOutcome.SUCCEEDED else "declined"
            intent = PaymentResult(
                self.outcome, f"pi_{number}", message, amount_cents, currency, charge_id
            )
            self.intents[idempotency_key] = intent
            self.by_id[f"pi_{number}"] = (customer_id, intent)
        self.charged.set()
        if customer_id in self.hanging:
            await asyncio.Event().wait()
        if self.gate is not None:
            await self.gate.wait()
        if self.lose_responses:
            self.lose_responses -= 1
            raise GatewayUnavailable("connection reset after the request was sent")
        return self.intents[idempotency_key]

    async def get_payment(self, payment_intent_id: str) -> PaymentResult:
        return self.by_id[payment_intent_id][1]

    async def find_payments(
        self, *, customer_id: str, charge_id: str, created_since: datetime
    ) -> list[PaymentResult]:
        return [
            intent
            for customer, intent in self.by_id.values()
            if customer == customer_id and intent.charge_id == charge_id
        ]

    def forget_keys(self) -> None:
        """Stripe forgets idempotency keys after a day; the PaymentIntents stay."""
        self.intents.clear()
        self.requests.clear()


@dataclass
class World:
    engine: AsyncEngine
    store: PaymentsStore
    ledger: LedgerStore
    clock: FakeClock
    stripe: FakeStripe

    def worker(self, lease: timedelta = LEASE) -> ChargeWorker:
        return ChargeWorker(self.store, self.stripe, self.clock, lease=lease)  # type: ignore[arg-type]

    async def tenant_with_card(self) -> str:
        tenant_id = f"tenant-{next(_tenants)}"
        await self.ledger.create_tenant(
            CreateTenant(f"create-{tenant_id}", tenant_id), "fp", 25_000_000, self.clock()
        )
        await self.store.set_customer(tenant_id, f"cus_{tenant_id}", self.clock())
        await self.store.save_card(tenant_id, Card(f"pm_{tenant_id}", "visa", "4242", None), START)
        return tenant_id

    async def enqueue(self, tenant_id: str, amount_micros: int = 10_000_000) -> Charge:
        now = self.clock()
        charge = await self.store.enqueue_charge(
            Charge(
                new_charge_id(),
                tenant_id,
                amount_micros,
                ChargeTrigger.MANUAL,
                ChargeStatus.PENDING,
                None,
                None,
                0,
                now,
                now,
            )
        )
        assert charge is not None
        return charge

    async def status(self, charge_id: str) -> ChargeStatus:
        charge = await self.store.get_charge(charge_id)
        assert charge is not None
        return charge.status

    async def entries(self, tenant_id: str) -> list[tuple[str, int]]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(ledger_entries.c.kind, ledger_entries.c.balance_delta_micros)
                .where(ledger_entries.c.tenant_id == tenant_id)
                .order_by(ledger_entries.c.entry_id)
            )
            return [(row.kind, row.balance_delta_micros) for row in rows]

    async def balance(self, tenant_id: str) -> int:
        account = await self.store.get_account(tenant_id)
        assert account is not None
        return account.balance_micros


@contextlib.asynccontextmanager
async def world_on(
    database_url: str,
    defaults: AutoTopUp = DEFAULTS,
    start: datetime = START,
    pool_size: int = 5,
) -> AsyncIterator[World]:
    """A migrated database with the store and a Stripe stand-in; the books audited after."""
    await migrate(database_url)
    engine = create_engine(database_url, pool_size=pool_size)
    try:
        yield World(
            engine,
            PaymentsStore(engine, defaults),
            LedgerStore(engine),
            FakeClock(start),
            FakeStripe(),
        )
        assert await audit_ledger(engine, check_exposure=False) == []
    finally:
        await engine.dispose()


@pytest.fixture
async def world(database_url: str) -> AsyncIterator[World]:
    async with world_on(database_url) as world:
        yield world


# Exactly once


async def test_a_lost_answer_is_retried_with_the_same_key_and_credits_once(world: World) -> None:
    tenant_id = await world.tenant_with_card()
    charge = await world.enqueue(tenant_id)
    world.stripe.lose_responses = 3
    worker = world.worker()

    await worker.run_once()
    assert (await world.store.get_charge(charge.charge_id)).status is ChargeStatus.PENDING  # type: ignore[union-attr]
    assert await worker.run_once() == 0  # the lease still holds it
    for _ in range(3):
        world.clock.advance(seconds=LEASE.total_seconds())
        await worker.run_once()

    settled = await world.store.get_charge(charge.charge_id)
    assert settled is not None
    assert (settled.status, settled.payment_intent_id) == (ChargeStatus.SUCCEEDED, "pi_1")
    assert len(world.stripe.intents) == 1
    assert world.stripe.calls == 4
    assert await world.entries(tenant_id) == [(EntryKind.TOP_UP, 10_000_000)]


async def test_a_worker_killed_mid_charge_is_replaced_and_the_charge_happens_once(
    world: World,
) -> None:
    tenant_id = await world.tenant_with_card()
    charge = await world.enqueue(tenant_id)
    world.stripe.gate = asyncio.Event()
    doomed = asyncio.create_task(world.worker().run_once())
    async with asyncio.timeout(10):
        await world.stripe.charged.wait()  # Stripe charged; the answer is held
    doomed.cancel()  # the process dies before it records anything
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert (await world.store.get_charge(charge.charge_id)).status is ChargeStatus.PENDING  # type: ignore[union-attr]

    world.stripe.gate.set()
    world.clock.advance(seconds=LEASE.total_seconds())
    await world.worker().run_once()

    assert len(world.stripe.intents) == 1
    assert await world.entries(tenant_id) == [(EntryKind.TOP_UP, 10_000_000)]
    assert await world.balance(tenant_id) == 10_000_000


async def test_workers_racing_for_the_same_charges_send_each_once(world: World) -> None:
    tenants = [await world.tenant_with_card() for _ in range(5)]
    for tenant_id in tenants:
        await world.enqueue(tenant_id)

    await asyncio.gather(*(world.worker().run_once() for _ in range(4)))

    assert world.stripe.calls == 5
    for tenant_id in tenants:
        assert await world.entries(tenant_id) == [(EntryKind.TOP_UP, 10_000_000)]


async def test_one_charge_in_flight_per_tenant(world: World) -> None:
    tenant_id = await world.tenant_with_card()
    first = await world.enqueue(tenant_id)
    second = await world.enqueue(tenant_id)
    assert second.charge_id == first.charge_id
    assert not await world.store.enqueue_automatic(tenant_id, new_charge_id(), world.clock())
    assert len(await world.store.charges_of(tenant_id)) == 1


async def test_automatic_top_up_rule(world: World) -> None:
    tenant_id = await world.tenant_with_card()
    assert await world.store.tenants_due_for_top_up(100) == []  # $25 available >= $5
    await world.ledger.update_tenant(
        UpdateTenant("lower", tenant_id, credit_limit_micros=4_999_999),
        "fp",
        world.clock(),
    )
    assert await world.store.tenants_due_for_top_up(100) == [tenant_id]
    await world.store.set_billing_status(tenant_id, BillingStatus.PAYMENT_FAILED, world.clock())
    assert await world.store.tenants_due_for_top_up(100) == []
    await world.store.set_billing_status(tenant_id, BillingStatus.GOOD_STANDING, world.clock())

    await world.worker().run_once()

    [charge] = await world.store.charges_of(tenant_id)
    assert (charge.trigger, charge.status, charge.amount_micros) == (
        ChargeTrigger.AUTOMATIC,
        ChargeStatus.SUCCEEDED,
        20_000_000,
    )


# Webhook facts


def _sink(world: World) -> PaymentsEventSink:
    account = AccountCore(world.store, None, world.clock, PageTokens.random())
    return PaymentsEventSink(world.store, account, None, world.clock)


def _facts(charge: Charge, payment_intent_id: str = "pi_webhook") -> PaymentIntentFacts:
    return PaymentIntentFacts(
        payment_intent_id, None, charge.amount_micros // 10_000, charge.charge_id, None, START
    )


async def test_success_recorded_by_webhook_and_worker_credits_once(world: World) -> None:
    tenant_id = await world.tenant_with_card()
    charge = await world.enqueue(tenant_id)
    sink = _sink(world)

    await sink.payment_intent_succeeded(_facts(charge, "pi_1"))
    await sink.payment_intent_succeeded(_facts(charge, "pi_1"))
    await world.worker().run_once()  # the worker's own answer arrives last
    await sink.payment_intent_failed(_facts(charge, "pi_1"))  # a stale, out-of-order fact

    settled = await world.store.get_charge(charge.charge_id)
    assert settled is not None
    assert settled.status is ChargeStatus.SUCCEEDED
    assert await world.entries(tenant_id) == [(EntryKind.TOP_UP, 10_000_000)]
    profile = await world.store.get_profile(tenant_id)
    assert profile is not None
    assert profile.billing_status is BillingStatus.GOOD_STANDING


async def test_refunds_are_reversed_up_to_the_cumulative_amount(world: World) -> None:
    tenant_id = await world.tenant_with_card()
    charge = await world.enqueue(tenant_id)
    await world.worker().run_once()
    sink = _sink(world)

    for cumulative_cents in (300, 300, 100, 700, 5000):
        await sink.charge_refunded(
            payment_intent_id="pi_1", amount_refunded_cents=cumulative_cents, occurred_at=START
        )

    assert await world.entries(tenant_id) == [
        (EntryKind.TOP_UP, 10_000_000),
        (EntryKind.TOP_UP_REVERSAL, -3_000_000),
        (EntryKind.TOP_UP_REVERSAL, -4_000_000),
        (EntryKind.TOP_UP_REVERSAL, -3_000_000),
    ]
    refunded = await world.store.get_charge(charge.charge_id)
    assert refunded is not None
    assert (refunded.status, refunded.refunded_micros) == (ChargeStatus.REFUNDED, 10_000_000)


async def test_a_refund_before_the_success_is_taken_back_when_the_success_lands(
    world: World,
) -> None:
    tenant_id = await world.tenant_with_card()
    charge = await world.enqueue(tenant_id)
    sink = _sink(world)
    # Stripe created the intent (its id is known) and refunded it before either the worker or
    # the success webhook recorded the success.
    async with world.engine.begin() as conn:
        await conn.execute(
            charges.update()
            .where(charges.c.charge_id == charge.charge_id)
            .values(payment_intent_id="pi_9")
        )

    await sink.charge_refunded(
        payment_intent_id="pi_9", amount_refunded_cents=400, occurred_at=START
    )
    assert await world.entries(tenant_id) == []
    await sink.payment_intent_succeeded(_facts(charge, "pi_9"))
    await sink.payment_intent_succeeded(_facts(charge, "pi_9"))

    assert await world.entries(tenant_id) == [
        (EntryKind.TOP_UP, 10_000_000),
        (EntryKind.TOP_UP_REVERSAL, -4_000_000),
    ]
    assert await world.balance(tenant_id) == 6_000_000


async def test_a_dispute_reverses_the_rest_once_and_suspends_metered_use(world: World) -> None:
    tenant_id = await world.tenant_with_card()
    charge = await world.enqueue(tenant_id)
    await world.worker().run_once()
    sink = _sink(world)
    await sink.charge_refunded(
        payment_intent_id="pi_1", amount_refunded_cents=200, occurred_at=START
    )

    for _ in range(2):
        await sink.dispute_created(payment_intent_id="pi_1", customer_id=None, occurred_at=START)
    await sink.payment_intent_succeeded(_facts(charge, "pi_1"))  # late: changes nothing

    assert await world.entries(tenant_id) == [
        (EntryKind.TOP_UP, 10_000_000),
        (EntryKind.TOP_UP_REVERSAL, -2_000_000),
        (EntryKind.TOP_UP_REVERSAL, -8_000_000),
    ]
    profile = await world.store.get_profile(tenant_id)
    assert profile is not None
    assert profile.billing_status is BillingStatus.DISPUTED
    account = await world.store.get_account(tenant_id)
    assert account is not None
    assert account.billing_status is BillingStatus.DISPUTED


async def test_a_detached_card_is_forgotten_once(world: World) -> None:
    tenant_id = await world.tenant_with_card()
    sink = _sink(world)
    for _ in range(2):
        await sink.payment_method_detached(
            payment_method_id=f"pm_{tenant_id}", customer_id=None, occurred_at=START
        )
    profile = await world.store.get_profile(tenant_id)
    assert profile is not None
    assert profile.card is None
    account = await world.store.get_account(tenant_id)
    assert account is not None
    assert not account.payment_method_on_file


async def test_a_failure_after_an_action_required_keeps_the_latest_problem(world: World) -> None:
    tenant_id = await world.tenant_with_card()
    charge = await world.enqueue(tenant_id)
    sink = _sink(world)

    await sink.payment_intent_requires_action(_facts(charge, "pi_5"))
    await sink.payment_intent_failed(_facts(charge, "pi_5"))
    await sink.payment_intent_requires_action(_facts(charge, "pi_5"))  # late: ignored

    settled = await world.store.get_charge(charge.charge_id)
    assert settled is not None
    assert settled.status is ChargeStatus.FAILED
    profile = await world.store.get_profile(tenant_id)
    assert profile is not None
    assert profile.billing_status is BillingStatus.PAYMENT_FAILED
    assert await world.entries(tenant_id) == []


async def test_a_charge_whose_card_was_removed_fails_without_blaming_the_tenant(
    world: World,
) -> None:
    tenant_id = await world.tenant_with_card()
    charge = await world.enqueue(tenant_id)
    await world.store.forget_card(tenant_id, None, world.clock())

    await world.worker().run_once()

    settled = await world.store.get_charge(charge.charge_id)
    assert settled is not None
    assert settled.status is ChargeStatus.FAILED
    assert world.stripe.calls == 0
    profile = await world.store.get_profile(tenant_id)
    assert profile is not None
    assert profile.billing_status is BillingStatus.GOOD_STANDING


async def test_a_charge_never_sent_is_sent_however_old(world: World) -> None:
    tenant_id = await world.tenant_with_card()
    charge = await world.enqueue(tenant_id)
    world.clock.advance(hours=30)  # Stripe down all along: its key was never used

    await world.worker().run_once()

    assert world.stripe.calls == 1
    assert await world.status(charge.charge_id) is ChargeStatus.SUCCEEDED
