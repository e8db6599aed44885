"""Stripe's events arrive late, twice and in any order; the tenant ends where the newest facts
put it, whatever the order.

The world of every case: card A saved; charge C1 made with A parked at ACTION_REQUIRED; card
B saved (the tenant's card now); charge C2 made with B, sent (its PaymentIntent known) and not
answered yet. Events about the old charge and card (C1, A) and the new ones (C2, B) are
delivered through the payments core's sink. What must hold (the model below): the billing
status follows the newest facts about the current card and the latest charge only (a dispute
suspends whatever its charge); a SetupIntent older than the current card never brings its
card back; every charge ends in the most advanced status its events allow and is credited
once; refunds and disputes are taken back once, up to the charge.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, select, update

from billing_service.domain.commands import CreateTenant
from billing_service.domain.ledger import EntryKind
from billing_service.domain.model import TenantStatus
from billing_service.domain.page_tokens import PageTokens
from billing_service.domain.payments import (
    AutoTopUp,
    BillingStatus,
    ChargeStatus,
    PaymentOutcome,
)
from billing_service.payments.account import AccountCore, Payments
from billing_service.payments.events import PaymentIntentFacts
from billing_service.payments.gateway import (
    CardDetails,
    PaymentResult,
    SetupIntentCreated,
    SetupIntentState,
)
from billing_service.payments.outbox import ChargeWorker
from billing_service.payments.sink import PaymentsEventSink
from billing_service.storage.audit import audit_ledger
from billing_service.storage.database import create_engine
from billing_service.storage.ledger_store import LedgerStore
from billing_service.storage.migrations import migrate
from billing_service.storage.payments_store import PaymentsStore
from billing_service.storage.tables import charges, ledger_entries, setup_intents, tenants
from tests.support.clock import FakeClock
from tests.support.postgres import PostgresServer

AMOUNT = 10_000_000
REFUNDED_CENTS = 100
START = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)
_numbers = itertools.count()

CHARGE_EVENTS = ("succeeded", "payment_failed", "requires_action", "refunded", "disputed")
CARD_EVENTS = ("detached", "setup_intent_succeeded")


@dataclass(frozen=True)
class Event:
    kind: str
    # "old": C1 or card A; "new": C2 or card B.
    age: str

    def __str__(self) -> str:
        return f"{self.kind}({self.age})"


EVERY_EVENT = [Event(kind, age) for kind in CHARGE_EVENTS + CARD_EVENTS for age in ("old", "new")]


@dataclass
class FakeStripe:
    """SetupIntents that succeed with their own card, and charges answered as told."""

    customer_id: str = field(default_factory=lambda: f"cus_{uuid.uuid4().hex[:12]}")
    outcome: PaymentOutcome | None = PaymentOutcome.REQUIRES_ACTION
    intents: dict[str, str] = field(default_factory=dict)

    async def create_customer(self, tenant_id: str, *, idempotency_key: str) -> str:
        return self.customer_id

    async def create_setup_intent(
        self, customer_id: str, *, idempotency_key: str
    ) -> SetupIntentCreated:
        number = next(_numbers)
        return SetupIntentCreated(f"seti_{number}", f"seti_{number}_secret")

    async def get_setup_intent(self, setup_intent_id: str) -> SetupIntentState:
        card = setup_intent_id.replace("seti_", "pm_")
        return SetupIntentState(setup_intent_id, "succeeded", self.customer_id, card)

    async def get_client_secret(self, setup_intent_id: str) -> str:
        return f"{setup_intent_id}_secret"

    async def get_card(self, payment_method_id: str) -> CardDetails:
        return CardDetails(payment_method_id, self.customer_id, "visa", "4242")

    async def attach_card(self, payment_method_id: str, customer_id: str) -> None:
        return None

    async def set_default_card(self, customer_id: str, payment_method_id: str) -> None:
        return None

    async def detach_card(self, payment_method_id: str) -> None:
        return None

    async def charge(self, **request: Any) -> PaymentResult:
        intent = self.intents.setdefault(request["idempotency_key"], f"pi_{next(_numbers)}")
        return PaymentResult(self.outcome, intent, "authenticate" if self.outcome else None)

    async def get_payment(self, payment_intent_id: str) -> PaymentResult:
        return PaymentResult(None, payment_intent_id, None)

    async def find_payments(self, **request: Any) -> list[Any]:
        return []

    async def cancel_payment(self, payment_intent_id: str) -> PaymentResult:
        return PaymentResult(None, payment_intent_id, None)


@dataclass
class World:
    """One tenant after the story above, and how to deliver events about it."""

    tenant_id: str
    sink: PaymentsEventSink
    store: PaymentsStore
    stripe: FakeStripe
    old_charge: str
    new_charge: str
    old_card: tuple[str, str]  # (SetupIntent, PaymentMethod)
    new_card: tuple[str, str]

    async def deliver(self, event: Event) -> None:
        at = START + timedelta(days=1)
        if event.kind in CHARGE_EVENTS:
            charge = await self.store.get_charge(
                self.old_charge if event.age == "old" else self.new_charge
            )
            assert charge is not None
            assert charge.payment_intent_id is not None
            intent = charge.payment_intent_id
            facts = PaymentIntentFacts(
                intent, self.stripe.customer_id, AMOUNT // 10_000, charge.charge_id, None, at
            )
            if event.kind == "succeeded":
                await self.sink.payment_intent_succeeded(facts)
            elif event.kind == "payment_failed":
                await self.sink.payment_intent_failed(facts)
            elif event.kind == "requires_action":
                await self.sink.payment_intent_requires_action(facts)
            elif event.kind == "refunded":
                await self.sink.charge_refunded(
                    payment_intent_id=intent, amount_refunded_cents=REFUNDED_CENTS, occurred_at=at
                )
            else:
                await self.sink.dispute_created(
                    payment_intent_id=intent, customer_id=self.stripe.customer_id, occurred_at=at
                )
            return
        setup_intent, card = self.old_card if event.age == "old" else self.new_card
        if event.kind == "detached":
            await self.sink.payment_method_detached(
                payment_method_id=card, customer_id=self.stripe.customer_id, occurred_at=at
            )
        else:
            await self.sink.setup_intent_succeeded(
                setup_intent_id=setup_intent,
                customer_id=self.stripe.customer_id,
                payment_method_id=card,
                occurred_at=at,
            )


@dataclass(frozen=True)
class Outcome:
    billing_status: BillingStatus
    card: str | None
    old_charge: ChargeStatus
    new_charge: ChargeStatus
    credited: dict[str, int]
    reversed: dict[str, int]


_ADVANCE = {
    ChargeStatus.PENDING: 0,
    ChargeStatus.ACTION_REQUIRED: 1,
    ChargeStatus.FAILED: 2,
    ChargeStatus.SUCCEEDED: 3,
}
_EVENT_STATUS = {
    "succeeded": ChargeStatus.SUCCEEDED,
    "payment_failed": ChargeStatus.FAILED,
    "requires_action": ChargeStatus.ACTION_REQUIRED,
}


def expected(world: World, events: list[Event]) -> Outcome:
    """What the set of facts says, whatever their order."""
    kinds = {(event.kind, event.age) for event in events}
    statuses = {"old": ChargeStatus.ACTION_REQUIRED, "new": ChargeStatus.PENDING}
    credited, taken_back = {}, {}
    for age, charge_id in (("old", world.old_charge), ("new", world.new_charge)):
        for kind, status in _EVENT_STATUS.items():
            if (kind, age) in kinds and _ADVANCE[status] > _ADVANCE[statuses[age]]:
                statuses[age] = status
        if statuses[age] is ChargeStatus.SUCCEEDED:
            credited[charge_id] = AMOUNT
            back = AMOUNT if ("disputed", age) in kinds else 0
            back = back or (REFUNDED_CENTS * 10_000 if ("refunded", age) in kinds else 0)
            if back:
                taken_back[charge_id] = back
                statuses[age] = ChargeStatus.REFUNDED
    card_removed = ("detached", "new") in kinds
    if any(kind == "disputed" for kind, _ in kinds):
        billing = BillingStatus.DISPUTED
    elif card_removed:
        billing = BillingStatus.GOOD_STANDING
    else:
        billing = {
            ChargeStatus.FAILED: BillingStatus.PAYMENT_FAILED,
            ChargeStatus.ACTION_REQUIRED: BillingStatus.ACTION_REQUIRED,
        }.get(statuses["new"], BillingStatus.GOOD_STANDING)
    return Outcome(
        billing,
        None if card_removed else world.new_card[1],
        statuses["old"],
        statuses["new"],
        credited,
        taken_back,
    )


class Runner:
    """One event loop and one database for every case (hypothesis calls tests synchronously)."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(migrate(url))
        self.engine = create_engine(url, pool_size=2)
        self.store = PaymentsStore(self.engine, AutoTopUp(False, 0, 5_000_000))
        self.ledger = LedgerStore(self.engine)
        self._story: World | None = None

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    async def world(self) -> World:
        """A new tenant in the state of the module's story: the story told once through the
        real calls, then its rows copied under new ids for every case."""
        if self._story is None:
            self._story = await self.story()
        return await self._copy(self._story)

    async def story(self) -> World:
        """A tenant brought into the module's story by the calls that do it in production."""
        clock = FakeClock(START)
        stripe = FakeStripe()
        worker = ChargeWorker(self.store, stripe, clock)  # type: ignore[arg-type]
        account = AccountCore(
            self.store,  # type: ignore[arg-type]
            Payments(stripe, worker),  # type: ignore[arg-type]
            clock,
            PageTokens.random(),
        )
        tenant_id = f"stale-{uuid.uuid4().hex[:12]}"
        await self.ledger.create_tenant(
            CreateTenant(str(uuid.uuid4()), tenant_id, 25_000_000, TenantStatus.ACTIVE, True),
            "fp",
            25_000_000,
            clock(),
        )

        async def save_card() -> tuple[str, str]:
            started = await account.create_setup_intent(str(uuid.uuid4()), tenant_id)
            clock.advance(seconds=1)
            profile = await account.confirm_payment_method(
                str(uuid.uuid4()), tenant_id, started.setup_intent_id
            )
            assert profile.card is not None
            clock.advance(seconds=1)
            return started.setup_intent_id, profile.card.payment_method_id

        old_card = await save_card()
        old_charge = await account.top_up_now(str(uuid.uuid4()), tenant_id, AMOUNT, 0)
        await worker.run_once()
        parked = await self.store.get_charge(old_charge.charge_id)
        assert parked is not None
        assert parked.status is ChargeStatus.ACTION_REQUIRED
        clock.advance(seconds=1)
        new_card = await save_card()
        new_charge = await account.top_up_now(str(uuid.uuid4()), tenant_id, AMOUNT, 0)
        # Sent; Stripe has not said yet how it ended.
        async with self.engine.begin() as conn:
            await conn.execute(
                update(charges)
                .where(charges.c.charge_id == new_charge.charge_id)
                .values(
                    payment_intent_id=f"pi_{next(_numbers)}",
                    attempts=1,
                    sent_at=clock(),
                    lease_until=START + timedelta(days=1),
                )
            )
        profile = await self.store.get_profile(tenant_id)
        assert profile is not None
        assert profile.billing_status is BillingStatus.GOOD_STANDING
        sink = PaymentsEventSink(self.store, account, worker, clock)
        return World(
            tenant_id,
            sink,
            self.store,
            stripe,
            old_charge.charge_id,
            new_charge.charge_id,
            old_card,
            new_card,
        )

    async def _copy(self, story: World) -> World:
        renamed = {
            story.tenant_id: f"stale-{uuid.uuid4().hex[:12]}",
            story.stripe.customer_id: f"cus_{uuid.uuid4().hex[:12]}",
            story.old_charge: f"chg_{uuid.uuid4().hex}",
            story.new_charge: f"chg_{uuid.uuid4().hex}",
        }
        for setup_intent, card in (story.old_card, story.new_card):
            number = next(_numbers)
            renamed |= {setup_intent: f"seti_{number}", card: f"pm_{number}"}
        async with self.engine.begin() as conn:
            rows = {
                table: [
                    dict(row._mapping)
                    for row in await conn.execute(
                        select(table).where(table.c.tenant_id == story.tenant_id)
                    )
                ]
                for table in (tenants, setup_intents, charges, ledger_entries)
            }
            assert rows[ledger_entries] == []
            for charge in rows[charges]:
                renamed[charge["payment_intent_id"]] = f"pi_{next(_numbers)}"
                renamed[charge["request_id"]] = str(uuid.uuid4())
            for table in (tenants, setup_intents, charges):
                await conn.execute(
                    insert(table),
                    [
                        {k: renamed.get(v, v) if isinstance(v, str) else v for k, v in row.items()}
                        for row in rows[table]
                    ],
                )
        stripe = FakeStripe(customer_id=renamed[story.stripe.customer_id])
        clock = FakeClock(START + timedelta(hours=1))
        worker = ChargeWorker(self.store, stripe, clock)  # type: ignore[arg-type]
        account = AccountCore(
            self.store,  # type: ignore[arg-type]
            Payments(stripe, worker),  # type: ignore[arg-type]
            clock,
            PageTokens.random(),
        )
        return World(
            renamed[story.tenant_id],
            PaymentsEventSink(self.store, account, worker, clock),
            self.store,
            stripe,
            renamed[story.old_charge],
            renamed[story.new_charge],
            (renamed[story.old_card[0]], renamed[story.old_card[1]]),
            (renamed[story.new_card[0]], renamed[story.new_card[1]]),
        )

    async def outcome(self, world: World) -> Outcome:
        profile = await self.store.get_profile(world.tenant_id)
        old = await self.store.get_charge(world.old_charge)
        new = await self.store.get_charge(world.new_charge)
        assert profile is not None
        assert old is not None
        assert new is not None
        credited: dict[str, int] = {}
        taken_back: dict[str, int] = {}
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(
                    ledger_entries.c.kind,
                    ledger_entries.c.charge_id,
                    ledger_entries.c.balance_delta_micros,
                ).where(ledger_entries.c.tenant_id == world.tenant_id)
            )
            for kind, charge_id, delta in rows:
                target = credited if kind == EntryKind.TOP_UP else taken_back
                target[charge_id] = target.get(charge_id, 0) + abs(delta)
        return Outcome(
            profile.billing_status,
            None if profile.card is None else profile.card.payment_method_id,
            old.status,
            new.status,
            credited,
            taken_back,
        )

    async def deliver_all(self, events: list[Event]) -> tuple[World, Outcome]:
        world = await self.world()
        for event in events:
            await world.deliver(event)
        return world, await self.outcome(world)

    def close(self) -> None:
        problems = self.run(audit_ledger(self.engine, check_exposure=False))
        self.run(self.engine.dispose())
        self.loop.close()
        assert problems == []


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def runner(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Runner]:
    if request.param == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        url = server.create_database(f"stale_events_{next(_numbers)}")
    else:
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('stale') / 'billing.db'}"
    runner = Runner(url)
    yield runner
    runner.close()


def test_the_story_of_the_issue_a_late_failure_of_a_parked_charge_changes_nothing(
    runner: Runner,
) -> None:
    async def story() -> tuple[World, Outcome]:
        world = await runner.story()
        for event in (Event("succeeded", "new"), Event("payment_failed", "old")):
            await world.deliver(event)
        return world, await runner.outcome(world)

    world, outcome = runner.run(story())
    assert outcome.billing_status is BillingStatus.GOOD_STANDING
    assert outcome.old_charge is ChargeStatus.FAILED
    assert outcome == expected(world, [Event("succeeded", "new"), Event("payment_failed", "old")])


@pytest.mark.parametrize("old_kind", CHARGE_EVENTS + CARD_EVENTS)
def test_every_pair_of_an_old_and_a_new_event_in_both_orders(runner: Runner, old_kind: str) -> None:
    async def both_orders(new_kind: str) -> list[str]:
        pair = [Event(old_kind, "old"), Event(new_kind, "new")]
        problems = []
        for events in (pair, pair[::-1]):
            world, outcome = await runner.deliver_all(events)
            if outcome != expected(world, events):
                problems.append(
                    f"{' then '.join(map(str, events))}: {outcome} != {expected(world, events)}"
                )
        return problems

    problems = [
        problem
        for new_kind in CHARGE_EVENTS + CARD_EVENTS
        for problem in runner.run(both_orders(new_kind))
    ]
    assert problems == []


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(events=st.lists(st.sampled_from(EVERY_EVENT), min_size=1, max_size=8), data=st.data())
def test_any_events_in_any_order_end_where_the_newest_facts_say(
    runner: Runner, events: list[Event], data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(events))
    world, outcome = runner.run(runner.deliver_all(shuffled))
    assert outcome == expected(world, shuffled)
