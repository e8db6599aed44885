"""The billing core over a real ledger, on SQLite and on PostgreSQL, to the micro.

Each test gets a fresh database; after each one the `make_core` fixture checks that the audit is
clean and that the tables agree with it (tests/ledger/books.py).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_service.core import BillingCore, CoreSettings, ReserveResult
from billing_service.domain.commands import (
    CheckAccess,
    Commit,
    CreateTenant,
    GrantCredit,
    QueryEstimate,
    Refund,
    Reserve,
    UpdateTenant,
    fingerprint,
)
from billing_service.domain.errors import (
    AlreadyExists,
    BillingError,
    ErrorReason,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from billing_service.domain.ledger import EntryKind
from billing_service.domain.model import (
    Account,
    Balance,
    DenialReason,
    Hold,
    HoldStatus,
    PaymentSource,
    TenantStatus,
)
from billing_service.domain.outcomes import RefundOutcome
from billing_service.domain.policy import Decision
from billing_service.domain.pricing import ModelBilling, PriceTable, TokenUsage
from billing_service.storage.ledger_store import LedgerStore
from billing_service.storage.tables import holds, ledger_entries, usage_records
from tests.ledger.books import entry_kinds, money, snapshot
from tests.ledger.conftest import FLAT, INCLUDED, PRICES, START, TOKENS, CoreFactory
from tests.support.clock import FakeClock

LIMIT = 25_000_000
UNKNOWN_RSV = "rsv_" + "0" * 32
# A TOKENS query of 1,000 input tokens and at most 500 output tokens holds 3,000 + 7,500.
ESTIMATE = QueryEstimate(1_000, 500)
ESTIMATE_HOLD = 10_500
# 900 x 3 + 100 x 0.3 + 400 x 15 = 2,700 + 30 + 6,000.
USAGE = TokenUsage(900, 100, 400)
USAGE_COST = 8_730


def output_tokens_costing(micros: int) -> TokenUsage:
    """A TOKENS usage of exactly `micros` (15 micros per output token)."""
    assert micros % 15 == 0
    return TokenUsage(0, 0, micros // 15)


async def new_tenant(
    core: BillingCore,
    tenant_id: str = "acme",
    *,
    card: bool = True,
    limit: int | None = None,
    prepaid: int = 0,
) -> None:
    await core.create_tenant(
        CreateTenant(
            f"create-{tenant_id}", tenant_id, credit_limit_micros=limit, payment_method_on_file=card
        )
    )
    if prepaid:
        await core.grant_credit(GrantCredit(f"prepay-{tenant_id}", tenant_id, prepaid, "prepaid"))


async def reserve(
    core: BillingCore,
    request_id: str,
    *,
    tenant_id: str = "acme",
    model: str = TOKENS,
    amount: int | None = None,
    estimate: QueryEstimate | None = None,
    ttl: timedelta | None = None,
) -> ReserveResult:
    if amount is None and estimate is None:
        estimate = ESTIMATE
    return await core.reserve(Reserve(request_id, tenant_id, "alice", model, estimate, amount, ttl))


async def granted(core: BillingCore, request_id: str, **kwargs: Any) -> Hold:
    result = await reserve(core, request_id, **kwargs)
    assert result.decision.allowed, result.decision
    assert result.hold is not None
    return result.hold


async def raises(reason: ErrorReason, call: Awaitable[object]) -> BillingError:
    with pytest.raises(BillingError) as raised:
        await call
    assert raised.value.reason is reason, raised.value
    return raised.value


# GrantCredit and tenants


async def test_grant_credit_adds_prepaid_credit(core: BillingCore, engine: AsyncEngine) -> None:
    created = await core.create_tenant(CreateTenant("c1", "acme"))
    assert created == Account("acme", TenantStatus.ACTIVE, LIMIT, False, 0, 0, START, START)

    first = await core.grant_credit(GrantCredit("g1", "acme", 5_000_000, "welcome credit"))
    second = await core.grant_credit(GrantCredit("g2", "acme", 2_500_000, "goodwill"))

    assert first.balance == Balance(5_000_000, 0, 0)
    assert second.balance == Balance(7_500_000, 0, 0)
    assert second.entry_id > first.entry_id
    tenant = await core.get_tenant("acme")
    assert (tenant.balance_micros, tenant.held_micros, tenant.available_micros) == (
        7_500_000,
        0,
        7_500_000,
    )
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(
                    ledger_entries.c.entry_id,
                    ledger_entries.c.kind,
                    ledger_entries.c.balance_delta_micros,
                    ledger_entries.c.balance_after_micros,
                    ledger_entries.c.memo,
                    ledger_entries.c.request_id,
                ).order_by(ledger_entries.c.entry_id)
            )
        ).all()
    assert [tuple(row) for row in rows] == [
        (first.entry_id, "grant", 5_000_000, 5_000_000, "welcome credit", "g1"),
        (second.entry_id, "grant", 2_500_000, 7_500_000, "goodwill", "g2"),
    ]


async def test_grant_credit_with_a_card_shows_the_extended_limit(core: BillingCore) -> None:
    await new_tenant(core, limit=10_000_000)
    outcome = await core.grant_credit(GrantCredit("g1", "acme", 1, "one micro"))
    assert outcome.balance == Balance(1, 0, 10_000_000)
    assert outcome.balance.available_micros == 10_000_001


async def test_grant_credit_to_an_unknown_tenant_is_not_found(
    core: BillingCore, engine: AsyncEngine
) -> None:
    # Even with automatic creation on: only the hot path creates tenants.
    await raises(
        ErrorReason.TENANT_NOT_FOUND, core.grant_credit(GrantCredit("g1", "ghost", 1, "x"))
    )
    assert (await snapshot(engine)).counts == (0, 0, 0, 0, 0)


async def test_create_and_update_tenant(core: BillingCore, clock: FakeClock) -> None:
    created = await core.create_tenant(
        CreateTenant(
            "c1",
            "acme",
            credit_limit_micros=0,
            status=TenantStatus.SUSPENDED,
            payment_method_on_file=True,
        )
    )
    assert created == Account("acme", TenantStatus.SUSPENDED, 0, True, 0, 0, START, START)
    clock.advance(seconds=5)
    updated = await core.update_tenant(
        UpdateTenant("u1", "acme", credit_limit_micros=7_000_000, status=TenantStatus.ACTIVE)
    )
    later = START + timedelta(seconds=5)
    assert updated == Account("acme", TenantStatus.ACTIVE, 7_000_000, True, 0, 0, START, later)
    # Fields left unset keep their value.
    unchanged = await core.update_tenant(UpdateTenant("u2", "acme"))
    assert replace(unchanged, updated_at=later) == updated
    card_off = await core.update_tenant(UpdateTenant("u3", "acme", payment_method_on_file=False))
    assert (card_off.credit_limit_micros, card_off.payment_method_on_file) == (7_000_000, False)
    assert await core.get_tenant("acme") == card_off
    await raises(ErrorReason.TENANT_ALREADY_EXISTS, core.create_tenant(CreateTenant("c2", "acme")))
    await raises(ErrorReason.TENANT_NOT_FOUND, core.update_tenant(UpdateTenant("u4", "ghost")))
    await raises(ErrorReason.TENANT_NOT_FOUND, core.get_tenant("ghost"))


# ReserveCredit


async def test_reserve_with_an_estimate_holds_its_uncached_cost(
    core: BillingCore, engine: AsyncEngine, store: LedgerStore
) -> None:
    await new_tenant(core)

    result = await reserve(core, "r1", estimate=ESTIMATE)

    assert result.decision == Decision(
        allowed=True,
        reason=None,
        message="",
        available_micros=LIMIT - ESTIMATE_HOLD,
        billing=ModelBilling.METERED,
        required_micros=ESTIMATE_HOLD,
    )
    hold = result.hold
    assert hold is not None
    assert re.fullmatch(r"rsv_[0-9a-f]{32}", hold.hold_id)
    assert hold == Hold(
        hold_id=hold.hold_id,
        request_id="r1",
        request_fingerprint=fingerprint(Reserve("r1", "acme", "alice", TOKENS, ESTIMATE)),
        tenant_id="acme",
        user_id="alice",
        model=TOKENS,
        price=PRICES.get(TOKENS),
        amount_micros=ESTIMATE_HOLD,
        status=HoldStatus.OPEN,
        created_at=START,
        expires_at=START + timedelta(minutes=5),
        decision_available_micros=LIMIT - ESTIMATE_HOLD,
    )
    assert await store.get_hold(hold.hold_id) == hold
    assert await money(engine, "acme") == (0, ESTIMATE_HOLD)
    assert await entry_kinds(engine, "acme") == ["hold"]


async def test_reserve_with_an_explicit_amount_and_ttl(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await new_tenant(core)
    # The flat model's price is $0.25 a call, but the caller may hold more.
    hold = await granted(core, "r1", model=FLAT, amount=1_000_000, ttl=timedelta(seconds=30))
    assert (hold.amount_micros, hold.expires_at) == (1_000_000, START + timedelta(seconds=30))
    # With an estimate the flat model holds its flat price.
    flat = await granted(core, "r2", model=FLAT, estimate=QueryEstimate(10**8, 10**8))
    assert flat.amount_micros == 250_000
    assert await money(engine, "acme") == (0, 1_250_000)
    second = await reserve(core, "r3", amount=LIMIT - 1_250_000)
    assert second.decision.allowed
    assert second.decision.available_micros == 0
    assert await money(engine, "acme") == (0, LIMIT)


async def test_payment_method_required_then_credit_limit_reached(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await new_tenant(core, card=False)
    refused = await reserve(core, "r1", amount=1)
    assert refused == ReserveResult(
        Decision(
            False,
            DenialReason.PAYMENT_METHOD_REQUIRED,
            "Add a payment method to use metered-tokens.",
            0,
            ModelBilling.METERED,
            1,
        ),
        None,
    )
    # Prepaid credit is spendable without a card, and only it.
    await core.grant_credit(GrantCredit("g1", "acme", 1_000_000, "prepaid"))
    await granted(core, "r2", amount=500_000)
    refused = await reserve(core, "r3", amount=500_001)
    assert refused.decision.reason is DenialReason.PAYMENT_METHOD_REQUIRED
    assert refused.decision.available_micros == 500_000
    await granted(core, "r4", amount=500_000)
    # A card extends the limit: 25,000,000 more.
    await core.update_tenant(UpdateTenant("u1", "acme", payment_method_on_file=True))
    await granted(core, "r5", amount=LIMIT)
    refused = await reserve(core, "r6", amount=1)
    assert refused.decision == Decision(
        False,
        DenialReason.CREDIT_LIMIT_REACHED,
        "Credit limit reached: this query needs $0.000001, $0.00 is available. "
        "Top up or wait for pending charges to settle.",
        0,
        ModelBilling.METERED,
        1,
    )
    assert await money(engine, "acme") == (1_000_000, 1_000_000 + LIMIT)
    # A denial is stored (to replay it) but moves nothing.
    assert await entry_kinds(engine, "acme") == ["grant", "hold", "hold", "hold"]


async def test_a_denial_reports_what_the_query_needs(core: BillingCore) -> None:
    await new_tenant(core, limit=1_000_000)
    await granted(core, "r1", amount=999_000)
    refused = await reserve(core, "r2", estimate=ESTIMATE)
    assert refused.decision == Decision(
        False,
        DenialReason.CREDIT_LIMIT_REACHED,
        "Credit limit reached: this query needs $0.0105, $0.001 is available. "
        "Top up or wait for pending charges to settle.",
        1_000,
        ModelBilling.METERED,
        ESTIMATE_HOLD,
    )


async def test_a_suspended_tenant_is_denied_but_may_settle_open_holds(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await new_tenant(core, prepaid=1_000_000)
    first = await granted(core, "r1")
    included = await granted(core, "r2", model=INCLUDED)
    suspended = await core.update_tenant(UpdateTenant("u1", "acme", status=TenantStatus.SUSPENDED))
    assert suspended.status is TenantStatus.SUSPENDED
    available = 1_000_000 + LIMIT - ESTIMATE_HOLD

    for model in (TOKENS, FLAT, INCLUDED):
        refused = await reserve(core, f"r-{model}", model=model)
        assert refused.hold is None
        assert refused.decision.reason is DenialReason.ACCOUNT_SUSPENDED
        assert refused.decision.message == (
            "This account is suspended. Contact support to restore access."
        )
        assert refused.decision.available_micros == available
        advice = await core.check_access(CheckAccess("acme", model))
        assert advice.reason is DenialReason.ACCOUNT_SUSPENDED

    # Open holds are honoured: they can still be committed or released.
    outcome = await core.commit(Commit("c1", first.hold_id, USAGE))
    assert outcome.record.charged_micros == USAGE_COST
    await core.refund(Refund("f1", included.hold_id))
    assert await money(engine, "acme") == (1_000_000 - USAGE_COST, 0)

    await core.update_tenant(UpdateTenant("u2", "acme", status=TenantStatus.ACTIVE))
    assert (await reserve(core, "r3")).decision.allowed


async def test_a_model_not_in_the_price_table_is_not_offered(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await new_tenant(core)
    refused = await reserve(core, "r1", model="gpt-9")
    assert refused == ReserveResult(
        Decision(
            False,
            DenialReason.MODEL_NOT_OFFERED,
            "The model 'gpt-9' is not offered.",
            LIMIT,
            None,
            0,
        ),
        None,
    )
    assert (await snapshot(engine)).counts == (1, 0, 0, 0, 1)


# Tenants are created by their first call, or are NOT_FOUND


async def test_a_first_call_creates_the_tenant(make_core: CoreFactory, engine: AsyncEngine) -> None:
    core = make_core(CoreSettings(default_credit_limit_micros=7_000_000))
    # Advice creates nothing.
    advice = await core.check_access(CheckAccess("newco", TOKENS))
    assert advice.reason is DenialReason.PAYMENT_METHOD_REQUIRED
    assert (await snapshot(engine)).counts == (0, 0, 0, 0, 0)

    refused = await reserve(core, "r1", tenant_id="newco")
    assert refused.decision.reason is DenialReason.PAYMENT_METHOD_REQUIRED
    assert refused.decision.available_micros == 0
    assert await core.get_tenant("newco") == Account(
        "newco", TenantStatus.ACTIVE, 7_000_000, False, 0, 0, START, START
    )

    included = await reserve(core, "r2", tenant_id="other", model=INCLUDED)
    assert included.decision.allowed
    assert (await core.get_tenant("other")).credit_limit_micros == 7_000_000

    # Once a card is on file the default limit applies.
    await core.update_tenant(UpdateTenant("u1", "newco", payment_method_on_file=True))
    assert (await reserve(core, "r3", tenant_id="newco", amount=7_000_000)).decision.allowed
    assert not (await reserve(core, "r4", tenant_id="newco", amount=1)).decision.allowed


async def test_unknown_tenants_are_not_found_when_auto_create_is_off(
    make_core: CoreFactory, engine: AsyncEngine
) -> None:
    core = make_core(CoreSettings(auto_create_tenants=False))
    for model in (TOKENS, INCLUDED, "gpt-9"):
        error = await raises(
            ErrorReason.TENANT_NOT_FOUND, reserve(core, "r1", tenant_id="x", model=model)
        )
        assert isinstance(error, NotFound)
        await raises(ErrorReason.TENANT_NOT_FOUND, core.check_access(CheckAccess("x", model)))
    await raises(ErrorReason.TENANT_NOT_FOUND, core.get_tenant("x"))
    await raises(ErrorReason.TENANT_NOT_FOUND, core.grant_credit(GrantCredit("g", "x", 1, "y")))
    await raises(ErrorReason.TENANT_NOT_FOUND, core.update_tenant(UpdateTenant("u", "x")))
    assert (await snapshot(engine)).counts == (0, 0, 0, 0, 0)
    # A created tenant works as usual, and the failed request_id is still free.
    await new_tenant(core)
    assert (await reserve(core, "r1")).decision.allowed


# Commit


async def test_commit_within_the_hold_charges_the_cost(
    core: BillingCore, engine: AsyncEngine, clock: FakeClock
) -> None:
    await new_tenant(core)
    hold = await granted(core, "r1")
    clock.advance(seconds=2)

    outcome = await core.commit(Commit("c1", hold.hold_id, USAGE))

    record = outcome.record
    assert (record.cost_micros, record.charged_micros, record.uncollected_micros) == (
        USAGE_COST,
        USAGE_COST,
        0,
    )
    assert (record.hold_id, record.tenant_id, record.user_id, record.model) == (
        hold.hold_id,
        "acme",
        "alice",
        TOKENS,
    )
    assert (record.usage, record.held_micros, record.payment_source) == (
        USAGE,
        ESTIMATE_HOLD,
        PaymentSource.CREDIT,
    )
    assert (record.reserved_at, record.committed_at) == (START, START + timedelta(seconds=2))
    assert outcome.available_after_micros == LIMIT - USAGE_COST
    assert await money(engine, "acme") == (-USAGE_COST, 0)
    assert await entry_kinds(engine, "acme") == ["hold", "debit"]


async def test_commit_above_the_hold_charges_it_all_while_it_fits(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await new_tenant(core)
    hold = await granted(core, "r1")
    # 2,000 x 3 + 1,000 x 15 = 21,000, twice the hold.
    outcome = await core.commit(Commit("c1", hold.hold_id, TokenUsage(2_000, 0, 1_000)))
    assert (outcome.record.charged_micros, outcome.record.uncollected_micros) == (21_000, 0)
    assert outcome.available_after_micros == LIMIT - 21_000
    assert await money(engine, "acme") == (-21_000, 0)


async def test_commit_above_the_hold_stops_at_the_credit_limit(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await new_tenant(core)
    hold = await granted(core, "r1", amount=24_990_000)  # 10,000 left
    outcome = await core.commit(Commit("c1", hold.hold_id, output_tokens_costing(25_020_000)))
    record = outcome.record
    assert (record.cost_micros, record.charged_micros, record.uncollected_micros) == (
        25_020_000,
        LIMIT,
        20_000,
    )
    assert outcome.available_after_micros == 0
    assert await money(engine, "acme") == (-LIMIT, 0)  # never below -limit
    refused = await reserve(core, "r2", amount=1)
    assert refused.decision.reason is DenialReason.CREDIT_LIMIT_REACHED


async def test_commit_above_the_hold_leaves_other_open_holds_their_credit(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await new_tenant(core)
    big = await granted(core, "r1", amount=20_000_000)
    small = await granted(core, "r2", amount=4_000_000)  # 1,000,000 left
    over = await core.commit(Commit("c1", big.hold_id, output_tokens_costing(22_500_000)))
    assert (over.record.charged_micros, over.record.uncollected_micros) == (21_000_000, 1_500_000)
    assert over.available_after_micros == 0
    assert await money(engine, "acme") == (-21_000_000, 4_000_000)
    within = await core.commit(Commit("c2", small.hold_id, output_tokens_costing(3_000_000)))
    assert (within.record.charged_micros, within.record.uncollected_micros) == (3_000_000, 0)
    assert within.available_after_micros == 1_000_000
    assert await money(engine, "acme") == (-24_000_000, 0)


async def test_commit_above_the_hold_without_a_card_stops_at_the_prepaid_credit(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await new_tenant(core, card=False, prepaid=1_000_000)
    hold = await granted(core, "r1", amount=600_000)
    outcome = await core.commit(Commit("c1", hold.hold_id, output_tokens_costing(1_500_000)))
    assert (outcome.record.charged_micros, outcome.record.uncollected_micros) == (
        1_000_000,
        500_000,
    )
    assert await money(engine, "acme") == (0, 0)


async def test_a_commit_rounds_its_cost_up_once(core: BillingCore, engine: AsyncEngine) -> None:
    await new_tenant(core)
    charged = 0
    # (input, cached, output) -> 3 x input + 0.3 x cached + 15 x output, rounded up once.
    for number, (usage, cost) in enumerate(
        [
            (TokenUsage(1, 1, 1), 19),  # 18.3
            (TokenUsage(0, 1, 0), 1),  # 0.3
            (TokenUsage(0, 3, 0), 1),  # 0.9
            (TokenUsage(0, 4, 0), 2),  # 1.2
            (TokenUsage(0, 10, 0), 3),  # exactly 3
            (TokenUsage(333, 3_333, 33), 2_494),  # 999 + 999.9 + 495 = 2,493.9
        ]
    ):
        hold = await granted(core, f"r{number}")
        outcome = await core.commit(Commit(f"c{number}", hold.hold_id, usage))
        assert (outcome.record.cost_micros, outcome.record.charged_micros) == (cost, cost)
        charged += cost
    included = await granted(core, "r-included", model=INCLUDED)
    # 1 x 1 + 1 x 0.1 + 1 x 5 = 6.1
    outcome = await core.commit(Commit("c-included", included.hold_id, TokenUsage(1, 1, 1)))
    assert (outcome.record.cost_micros, outcome.record.charged_micros) == (7, 0)
    assert await money(engine, "acme") == (-charged, 0)


async def test_a_commit_of_zero_tokens_costs_the_flat_price(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await new_tenant(core)
    flat = await granted(core, "r1", model=FLAT, estimate=QueryEstimate(0, 1))
    outcome = await core.commit(Commit("c1", flat.hold_id, TokenUsage()))
    assert (outcome.record.cost_micros, outcome.record.charged_micros) == (250_000, 250_000)
    tokens = await granted(core, "r2")
    outcome = await core.commit(Commit("c2", tokens.hold_id, TokenUsage()))
    assert (outcome.record.cost_micros, outcome.record.charged_micros) == (0, 0)
    assert await money(engine, "acme") == (-250_000, 0)


async def test_a_hold_keeps_the_price_it_was_taken_at(
    make_core: CoreFactory, engine: AsyncEngine
) -> None:
    core = make_core()
    await new_tenant(core)
    hold = await granted(core, "r1")
    tokens = PRICES.models[TOKENS]
    doubled = PriceTable(
        {
            **PRICES.models,
            TOKENS: replace(
                tokens,
                cached_input_micros_per_mtok=600_000,
                input_micros_per_mtok=6_000_000,
                output_micros_per_mtok=30_000_000,
            ),
        }
    )
    repriced = make_core(prices=doubled)
    outcome = await repriced.commit(Commit("c1", hold.hold_id, USAGE))
    assert outcome.record.cost_micros == USAGE_COST
    assert await money(engine, "acme") == (-USAGE_COST, 0)


async def test_commit_of_a_settled_or_expired_hold_says_why_not(
    core: BillingCore, engine: AsyncEngine, clock: FakeClock
) -> None:
    await new_tenant(core)
    committed = await granted(core, "r1")
    released = await granted(core, "r2")
    expiring = await granted(core, "r3", ttl=timedelta(seconds=10))
    await core.commit(Commit("c1", committed.hold_id, USAGE))
    await core.refund(Refund("f1", released.hold_id))
    before = await snapshot(engine)

    await raises(
        ErrorReason.HOLD_ALREADY_COMMITTED, core.commit(Commit("c2", committed.hold_id, USAGE))
    )
    await raises(ErrorReason.HOLD_RELEASED, core.commit(Commit("c3", released.hold_id, USAGE)))
    await raises(ErrorReason.RESERVATION_NOT_FOUND, core.commit(Commit("c4", UNKNOWN_RSV, USAGE)))
    clock.advance(seconds=9)
    assert await core.release_expired() == 0
    clock.advance(seconds=1)  # exactly its expire time: expired, swept or not
    error = await raises(
        ErrorReason.HOLD_EXPIRED, core.commit(Commit("c5", expiring.hold_id, USAGE))
    )
    assert isinstance(error, FailedPrecondition)
    assert await snapshot(engine) == before  # failed calls change nothing
    assert await core.release_expired() == 1
    await raises(ErrorReason.HOLD_EXPIRED, core.commit(Commit("c5", expiring.hold_id, USAGE)))
    assert await money(engine, "acme") == (-USAGE_COST, 0)


# Refund: release an open hold, or give back part of a charge


async def test_refund_of_an_open_hold_releases_it(
    core: BillingCore, engine: AsyncEngine, store: LedgerStore, clock: FakeClock
) -> None:
    await new_tenant(core)
    hold = await granted(core, "r1")
    clock.advance(seconds=1)
    command = Refund("f1", hold.hold_id, 0, "model timed out")
    outcome = await core.refund(command)
    assert outcome == RefundOutcome(
        EntryKind.RELEASE, ESTIMATE_HOLD, LIMIT, 0, fingerprint(command)
    )
    assert await money(engine, "acme") == (0, 0)
    stored = await store.get_hold(hold.hold_id)
    assert stored is not None
    assert (stored.status, stored.settled_at) == (
        HoldStatus.RELEASED,
        START + timedelta(seconds=1),
    )
    async with engine.connect() as conn:
        memo = (
            await conn.execute(
                select(ledger_entries.c.memo).where(ledger_entries.c.kind == "release")
            )
        ).scalar_one()
    assert memo == "model timed out"
    await raises(ErrorReason.HOLD_RELEASED, core.refund(Refund("f2", hold.hold_id)))
    await raises(ErrorReason.HOLD_RELEASED, core.refund(Refund("f3", hold.hold_id, 5)))
    await raises(ErrorReason.RESERVATION_NOT_FOUND, core.refund(Refund("f4", UNKNOWN_RSV)))


async def test_an_open_hold_cannot_be_partly_released(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await new_tenant(core)
    hold = await granted(core, "r1")
    before = await snapshot(engine)
    await raises(
        ErrorReason.PARTIAL_RELEASE_NOT_ALLOWED, core.refund(Refund("f1", hold.hold_id, 1))
    )
    assert await snapshot(engine) == before


async def test_partial_then_full_refund_of_a_charge(core: BillingCore, engine: AsyncEngine) -> None:
    await new_tenant(core)
    hold = await granted(core, "r1")
    await core.commit(Commit("c1", hold.hold_id, USAGE))

    part = await core.refund(Refund("f1", hold.hold_id, 1_000, "ticket 4411"))
    assert (part.kind, part.amount_micros, part.refunded_total_micros) == (
        EntryKind.REFUND,
        1_000,
        1_000,
    )
    assert part.available_after_micros == LIMIT - USAGE_COST + 1_000
    assert await money(engine, "acme") == (-USAGE_COST + 1_000, 0)

    rest = await core.refund(Refund("f2", hold.hold_id, refund_all=True))
    assert (rest.kind, rest.amount_micros, rest.refunded_total_micros) == (
        EntryKind.REFUND,
        USAGE_COST - 1_000,
        USAGE_COST,
    )
    assert rest.available_after_micros == LIMIT
    assert await money(engine, "acme") == (0, 0)

    before = await snapshot(engine)
    await raises(ErrorReason.REFUND_EXCEEDS_CHARGE, core.refund(Refund("f3", hold.hold_id, 1)))
    await raises(
        ErrorReason.REFUND_EXCEEDS_CHARGE,
        core.refund(Refund("f4", hold.hold_id, refund_all=True)),
    )
    assert await snapshot(engine) == before
    assert await entry_kinds(engine, "acme") == ["hold", "debit", "refund", "refund"]


async def test_a_refund_above_the_charge_is_refused(core: BillingCore, engine: AsyncEngine) -> None:
    await new_tenant(core)
    hold = await granted(core, "r1")
    await core.commit(Commit("c1", hold.hold_id, USAGE))
    before = await snapshot(engine)
    error = await raises(
        ErrorReason.REFUND_EXCEEDS_CHARGE, core.refund(Refund("f1", hold.hold_id, USAGE_COST + 1))
    )
    assert isinstance(error, FailedPrecondition)
    assert await snapshot(engine) == before
    exact = await core.refund(Refund("f2", hold.hold_id, USAGE_COST))
    assert exact.refunded_total_micros == USAGE_COST


async def test_only_the_charged_part_of_a_capped_commit_is_refundable(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await new_tenant(core, limit=1_000_000)
    hold = await granted(core, "r1", amount=1_000_000)
    outcome = await core.commit(Commit("c1", hold.hold_id, output_tokens_costing(1_500_000)))
    assert outcome.record.uncollected_micros == 500_000
    await raises(
        ErrorReason.REFUND_EXCEEDS_CHARGE, core.refund(Refund("f1", hold.hold_id, 1_000_001))
    )
    everything = await core.refund(Refund("f2", hold.hold_id, refund_all=True))
    assert everything.amount_micros == 1_000_000
    assert await money(engine, "acme") == (0, 0)


# Included models


async def test_an_included_model_is_recorded_at_its_price_and_never_charged(
    core: BillingCore, engine: AsyncEngine, store: LedgerStore
) -> None:
    await new_tenant(core, card=False)  # no card and no credit: included models still run
    result = await reserve(core, "r1", model=INCLUDED, estimate=QueryEstimate(1_000, 500))
    assert result.decision == Decision(True, None, "", 0, ModelBilling.INCLUDED, 0)
    assert result.hold is not None
    assert result.hold.amount_micros == 0
    explicit = await granted(core, "r2", model=INCLUDED, amount=5_000_000)
    assert explicit.amount_micros == 0

    # 1,000 x 1 + 200 x 0.1 + 512 x 5 = 1,000 + 20 + 2,560
    outcome = await core.commit(Commit("c1", result.hold.hold_id, TokenUsage(1_000, 200, 512)))
    record = outcome.record
    assert (record.cost_micros, record.charged_micros, record.uncollected_micros) == (3_580, 0, 0)
    assert (record.payment_source, record.held_micros) == (PaymentSource.INCLUDED, 0)
    assert outcome.available_after_micros == 0
    # Far above any hold, still nothing charged and nothing uncollected.
    big = await core.commit(Commit("c2", explicit.hold_id, TokenUsage(0, 0, 10**8)))
    assert (big.record.cost_micros, big.record.charged_micros) == (500_000_000, 0)
    assert await money(engine, "acme") == (0, 0)
    assert await entry_kinds(engine, "acme") == []
    await raises(
        ErrorReason.REFUND_EXCEEDS_CHARGE,
        core.refund(Refund("f1", result.hold.hold_id, refund_all=True)),
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(select(usage_records.c.payment_source))).scalars().all()
    assert rows == ["included", "included"]


async def test_an_included_hold_can_be_released_or_expire(
    core: BillingCore, engine: AsyncEngine, clock: FakeClock
) -> None:
    await new_tenant(core)
    released = await granted(core, "r1", model=INCLUDED)
    expiring = await granted(core, "r2", model=INCLUDED, ttl=timedelta(seconds=1))
    outcome = await core.refund(Refund("f1", released.hold_id))
    assert (outcome.kind, outcome.amount_micros, outcome.available_after_micros) == (
        EntryKind.RELEASE,
        0,
        LIMIT,
    )
    clock.advance(seconds=1)
    assert await core.release_expired() == 1
    await raises(ErrorReason.HOLD_EXPIRED, core.commit(Commit("c1", expiring.hold_id, USAGE)))
    assert await money(engine, "acme") == (0, 0)


# Expiry


async def test_expired_holds_are_released_by_the_sweep(
    core: BillingCore, engine: AsyncEngine, store: LedgerStore, clock: FakeClock
) -> None:
    await new_tenant(core)
    short = [
        await granted(core, f"r{i}", amount=1_000, ttl=timedelta(seconds=10)) for i in range(3)
    ]
    long = await granted(core, "r-long", amount=5_000, ttl=timedelta(minutes=10))
    assert await money(engine, "acme") == (0, 8_000)

    clock.advance(seconds=9, microseconds=999_999)
    assert await core.release_expired() == 0
    clock.advance(microseconds=1)
    # Still counted until the sweep runs: a hold is released by a transaction, not by a clock.
    assert await money(engine, "acme") == (0, 8_000)
    assert await core.release_expired(limit=2) == 2
    assert await money(engine, "acme") == (0, 6_000)
    assert await core.release_expired() == 1
    assert await core.release_expired() == 0
    assert await money(engine, "acme") == (0, 5_000)
    for hold in short:
        stored = await store.get_hold(hold.hold_id)
        assert stored is not None
        assert (stored.status, stored.settled_at) == (HoldStatus.EXPIRED, clock.now)
        await raises(
            ErrorReason.HOLD_EXPIRED, core.refund(Refund(f"f-{hold.hold_id}", hold.hold_id))
        )
    # The long hold is untouched and still commits.
    outcome = await core.commit(Commit("c1", long.hold_id, output_tokens_costing(4_500)))
    assert outcome.record.charged_micros == 4_500
    assert await money(engine, "acme") == (-4_500, 0)
    assert await entry_kinds(engine, "acme") == ["hold"] * 4 + ["expiry"] * 3 + ["debit"]


async def test_an_open_hold_past_its_expire_time_is_expired_by_its_release(
    core: BillingCore, engine: AsyncEngine, clock: FakeClock
) -> None:
    await new_tenant(core)
    hold = await granted(core, "r1", ttl=timedelta(seconds=1))
    clock.advance(seconds=5)
    # Not swept yet: the release does what the sweep would have. Nothing was charged.
    await raises(ErrorReason.HOLD_EXPIRED, core.refund(Refund("f1", hold.hold_id)))
    assert await core.release_expired() == 0
    assert await money(engine, "acme") == (0, 0)
    assert await entry_kinds(engine, "acme") == ["hold", "expiry"]


# CheckAccess


async def test_check_access_is_advice_that_holds_nothing(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await new_tenant(core, limit=20_000)
    assert await core.check_access(CheckAccess("acme", TOKENS, ESTIMATE)) == Decision(
        True, None, "", 20_000, ModelBilling.METERED, ESTIMATE_HOLD
    )
    no_estimate = await core.check_access(CheckAccess("acme", TOKENS))
    assert (no_estimate.allowed, no_estimate.required_micros) == (True, 1)
    flat = await core.check_access(CheckAccess("acme", FLAT))
    assert (flat.allowed, flat.reason, flat.required_micros) == (
        False,
        DenialReason.CREDIT_LIMIT_REACHED,
        250_000,
    )
    included = await core.check_access(CheckAccess("acme", INCLUDED, ESTIMATE))
    assert included == Decision(True, None, "", 20_000, ModelBilling.INCLUDED, 0)
    not_offered = await core.check_access(CheckAccess("acme", "gpt-9"))
    assert not_offered.reason is DenialReason.MODEL_NOT_OFFERED
    assert await money(engine, "acme") == (0, 0)
    await granted(core, "r1", amount=15_000)
    assert not (await core.check_access(CheckAccess("acme", TOKENS, ESTIMATE))).allowed


# Invalid requests change nothing


async def test_invalid_requests_change_nothing(core: BillingCore, engine: AsyncEngine) -> None:
    await new_tenant(core)
    hold = await granted(core, "r1")
    before = await snapshot(engine)
    calls = [
        (core.reserve(Reserve("r2", "new tenant", "u", TOKENS, amount_micros=1)), "tenant_id"),
        (core.reserve(Reserve("r2", "acme", "u", TOKENS)), "size"),
        (core.reserve(Reserve("r2", "acme", "u", TOKENS, amount_micros=0)), "amount_micros"),
        (
            core.reserve(Reserve("r2", "acme", "u", TOKENS, amount_micros=1, ttl=timedelta())),
            "ttl",
        ),
        (core.commit(Commit("c1", hold.hold_id, TokenUsage(-1, 0, 0))), "usage.input_tokens"),
        (core.commit(Commit("c1", hold.hold_id.upper(), USAGE)), "reservation_id"),
        (core.refund(Refund("", hold.hold_id)), "request_id"),
        (core.grant_credit(GrantCredit("g1", "acme", 0, "zero")), "amount_micros"),
        (core.create_tenant(CreateTenant("c", "x" * 129)), "tenant_id"),
        (
            core.update_tenant(UpdateTenant("u", "acme", credit_limit_micros=-1)),
            "credit_limit_micros",
        ),
        (core.check_access(CheckAccess("acme", "")), "model"),
        (core.get_tenant(""), "tenant_id"),
    ]
    for call, field in calls:
        with pytest.raises(InvalidArgument) as raised:
            await call
        assert raised.value.field == field
    assert await snapshot(engine) == before


# Idempotency: a retry returns the first answer and changes nothing


async def test_a_retried_reserve_returns_the_same_hold(
    core: BillingCore, engine: AsyncEngine, clock: FakeClock
) -> None:
    await new_tenant(core)
    command = Reserve("r1", "acme", "alice", TOKENS, ESTIMATE)
    first = await core.reserve(command)
    before = await snapshot(engine)
    clock.advance(seconds=3)
    assert await core.reserve(command) == first
    assert await snapshot(engine) == before

    # Even once the tenant has no credit left, the retry still returns the original grant.
    await granted(core, "r2", amount=LIMIT - ESTIMATE_HOLD)
    assert not (await reserve(core, "r3", amount=1)).decision.allowed
    before = await snapshot(engine)
    assert await core.reserve(command) == first
    assert await snapshot(engine) == before
    assert await money(engine, "acme") == (0, LIMIT)


async def test_a_retried_reserve_replays_the_hold_as_first_granted(core: BillingCore) -> None:
    await new_tenant(core)
    command = Reserve("r1", "acme", "alice", TOKENS, ESTIMATE)
    first = await core.reserve(command)
    assert first.hold is not None
    await core.commit(Commit("c1", first.hold.hold_id, USAGE))
    retried = await core.reserve(command)
    assert retried.decision == first.decision  # this part holds
    assert retried.hold is not None
    assert (retried.hold.status, retried.hold.settled_at) == (HoldStatus.OPEN, None)


async def test_a_retried_denial_returns_the_same_denial(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await new_tenant(core, card=False)
    command = Reserve("r1", "acme", "alice", TOKENS, amount_micros=1_000)
    first = await core.reserve(command)
    assert first.decision.reason is DenialReason.PAYMENT_METHOD_REQUIRED
    # The tenant could now afford it: the retry still replays the denial, and holds nothing.
    await core.grant_credit(GrantCredit("g1", "acme", 5_000_000, "prepaid"))
    await core.update_tenant(UpdateTenant("u1", "acme", payment_method_on_file=True))
    before = await snapshot(engine)
    assert await core.reserve(command) == first
    assert await snapshot(engine) == before
    assert await money(engine, "acme") == (5_000_000, 0)


async def test_a_retried_suspension_denial_returns_the_same_denial(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await new_tenant(core)
    await core.update_tenant(UpdateTenant("u1", "acme", status=TenantStatus.SUSPENDED))
    command = Reserve("r1", "acme", "alice", INCLUDED, ESTIMATE)
    first = await core.reserve(command)
    assert first.decision.reason is DenialReason.ACCOUNT_SUSPENDED
    await core.update_tenant(UpdateTenant("u2", "acme", status=TenantStatus.ACTIVE))
    before = await snapshot(engine)
    assert await core.reserve(command) == first
    assert await snapshot(engine) == before


@pytest.mark.parametrize(
    "changed",
    [
        {"tenant_id": "other"},
        {"user_id": "bob"},
        {"model": FLAT},
        {"model": INCLUDED},
        {"estimate": QueryEstimate(1_000, 501)},
        {"estimate": None, "amount_micros": ESTIMATE_HOLD},
        {"ttl": timedelta(minutes=5)},
    ],
)
async def test_a_reserve_request_id_reused_for_another_request_is_refused(
    core: BillingCore, engine: AsyncEngine, changed: dict[str, Any]
) -> None:
    await new_tenant(core)
    await new_tenant(core, "other")
    command = Reserve("r1", "acme", "alice", TOKENS, ESTIMATE)
    await core.reserve(command)
    before = await snapshot(engine)
    error = await raises(
        ErrorReason.REQUEST_ID_REUSED,
        core.reserve(replace(command, **changed)),
    )
    assert isinstance(error, AlreadyExists)
    assert await snapshot(engine) == before


async def test_a_denied_reserve_request_id_reused_for_another_request_is_refused(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await new_tenant(core, card=False)
    await reserve(core, "r1", amount=1)
    before = await snapshot(engine)
    await raises(ErrorReason.REQUEST_ID_REUSED, reserve(core, "r1", amount=2))
    await raises(ErrorReason.REQUEST_ID_REUSED, reserve(core, "r1", model=INCLUDED))
    assert await snapshot(engine) == before


async def test_a_retried_commit_returns_the_same_record(
    core: BillingCore, engine: AsyncEngine, clock: FakeClock
) -> None:
    await new_tenant(core)
    hold = await granted(core, "r1", ttl=timedelta(seconds=10))
    command = Commit("c1", hold.hold_id, TokenUsage(2_000, 0, 1_000))  # above the hold
    first = await core.commit(command)
    before = await snapshot(engine)
    # Later, after the hold's expire time and other activity, the retry replays the first answer.
    clock.advance(minutes=1)
    await granted(core, "r2", amount=1_000_000)
    await core.release_expired()
    middle = await snapshot(engine)
    assert await core.commit(command) == first
    assert await snapshot(engine) == middle
    assert before != middle

    await raises(ErrorReason.REQUEST_ID_REUSED, core.commit(replace(command, usage=USAGE)))
    # The same request_id for another (open) reservation: refused, and that hold stays open.
    other = await granted(core, "r3")
    before = await snapshot(engine)
    await raises(
        ErrorReason.REQUEST_ID_REUSED, core.commit(replace(command, reservation_id=other.hold_id))
    )
    assert await snapshot(engine) == before
    assert (await core.commit(Commit("c2", other.hold_id, USAGE))).record.charged_micros == (
        USAGE_COST
    )


async def test_retried_refunds_return_the_same_answer(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await new_tenant(core)
    open_hold = await granted(core, "r1")
    charged = await granted(core, "r2")
    await core.commit(Commit("c1", charged.hold_id, USAGE))

    release = Refund("f1", open_hold.hold_id, 0, "cancelled")
    part = Refund("f2", charged.hold_id, 1_000)
    first_release = await core.refund(release)
    first_part = await core.refund(part)
    before = await snapshot(engine)
    assert await core.refund(release) == first_release
    assert await core.refund(part) == first_part
    assert await snapshot(engine) == before

    # After more refunds of the same charge, a retry still answers as of its first run.
    rest = Refund("f3", charged.hold_id, refund_all=True)
    first_rest = await core.refund(rest)
    assert first_rest.refunded_total_micros == USAGE_COST
    before = await snapshot(engine)
    assert await core.refund(part) == first_part
    assert await core.refund(rest) == first_rest
    assert await core.refund(release) == first_release
    assert await snapshot(engine) == before

    for reused in (
        replace(part, amount_micros=999),
        replace(part, reason="another reason"),
        replace(release, reservation_id=charged.hold_id),
        replace(rest, amount_micros=1, refund_all=False),
    ):
        await raises(ErrorReason.REQUEST_ID_REUSED, core.refund(reused))
    assert await snapshot(engine) == before


async def test_a_refund_request_id_reused_on_a_refundable_charge_is_refused(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await new_tenant(core)
    first = await granted(core, "r1")
    second = await granted(core, "r2")
    await core.commit(Commit("c1", first.hold_id, USAGE))
    await core.commit(Commit("c2", second.hold_id, USAGE))
    await core.refund(Refund("f1", first.hold_id, 1_000))
    before = await snapshot(engine)
    # Would succeed as a new request; as a reused request_id it must change nothing.
    await raises(ErrorReason.REQUEST_ID_REUSED, core.refund(Refund("f1", second.hold_id, 1_000)))
    await raises(ErrorReason.REQUEST_ID_REUSED, core.refund(Refund("f1", first.hold_id, 2_000)))
    assert await snapshot(engine) == before


async def test_a_retried_grant_returns_the_same_entry(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await new_tenant(core)
    command = GrantCredit("g1", "acme", 5_000_000, "welcome")
    first = await core.grant_credit(command)
    await core.grant_credit(GrantCredit("g2", "acme", 1_000_000, "more"))
    await granted(core, "r1", amount=3)
    before = await snapshot(engine)
    retried = await core.grant_credit(command)
    assert retried == first
    assert retried.balance == Balance(5_000_000, 0, LIMIT)
    assert await snapshot(engine) == before
    await raises(
        ErrorReason.REQUEST_ID_REUSED, core.grant_credit(replace(command, amount_micros=5))
    )
    await raises(ErrorReason.REQUEST_ID_REUSED, core.grant_credit(replace(command, reason="x")))
    assert await snapshot(engine) == before


async def test_grant_and_refund_share_one_request_id_space(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await new_tenant(core)
    hold = await granted(core, "r1")
    await core.refund(Refund("same-id", hold.hold_id))
    before = await snapshot(engine)
    await raises(
        ErrorReason.REQUEST_ID_REUSED, core.grant_credit(GrantCredit("same-id", "acme", 1, "x"))
    )
    await core.grant_credit(GrantCredit("grant-id", "acme", 1, "x"))
    other = await granted(core, "r2")
    middle = await snapshot(engine)
    await raises(ErrorReason.REQUEST_ID_REUSED, core.refund(Refund("grant-id", other.hold_id)))
    assert await snapshot(engine) == middle
    assert before != middle


async def test_retried_tenant_changes_return_the_same_tenant(
    core: BillingCore, engine: AsyncEngine, clock: FakeClock
) -> None:
    create = CreateTenant("c1", "acme", credit_limit_micros=1_000_000)
    created = await core.create_tenant(create)
    clock.advance(seconds=1)
    update = UpdateTenant("u1", "acme", payment_method_on_file=True)
    updated = await core.update_tenant(update)
    clock.advance(seconds=1)
    await core.update_tenant(UpdateTenant("u2", "acme", credit_limit_micros=2_000_000))
    await core.grant_credit(GrantCredit("g1", "acme", 7, "x"))
    before = await snapshot(engine)
    clock.advance(seconds=1)
    assert await core.create_tenant(create) == created
    assert await core.update_tenant(update) == updated
    assert await snapshot(engine) == before
    await raises(
        ErrorReason.REQUEST_ID_REUSED, core.create_tenant(replace(create, credit_limit_micros=5))
    )
    await raises(ErrorReason.REQUEST_ID_REUSED, core.create_tenant(replace(create, tenant_id="b")))
    await raises(
        ErrorReason.REQUEST_ID_REUSED,
        core.update_tenant(replace(update, payment_method_on_file=False)),
    )
    await raises(ErrorReason.REQUEST_ID_REUSED, core.update_tenant(UpdateTenant("c1", "acme")))
    assert await snapshot(engine) == before
    tenant = await core.get_tenant("acme")
    assert (tenant.credit_limit_micros, tenant.payment_method_on_file, tenant.balance_micros) == (
        2_000_000,
        True,
        7,
    )


async def test_a_failed_call_leaves_its_request_id_free(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await new_tenant(core)
    hold = await granted(core, "r1")
    await raises(
        ErrorReason.PARTIAL_RELEASE_NOT_ALLOWED, core.refund(Refund("f1", hold.hold_id, 5))
    )
    outcome = await core.refund(Refund("f1", hold.hold_id))
    assert outcome.kind is EntryKind.RELEASE
    async with engine.connect() as conn:
        count = len((await conn.execute(select(holds.c.hold_id))).all())
    assert count == 1


# A model missing from the price table is decided without writing anything, but a request_id
# already used is still one request.


async def test_a_request_id_reused_for_a_model_not_offered_is_refused(
    core: BillingCore,
) -> None:
    await new_tenant(core)
    await granted(core, "r1")
    await raises(ErrorReason.REQUEST_ID_REUSED, reserve(core, "r1", model="gpt-9"))


async def test_a_retried_reserve_after_its_model_left_the_price_table_returns_the_grant(
    make_core: CoreFactory, engine: AsyncEngine
) -> None:
    core = make_core()
    await new_tenant(core)
    command = Reserve("r1", "acme", "alice", TOKENS, ESTIMATE)
    first = await core.reserve(command)
    refused = Reserve("r2", "acme", "alice", TOKENS, amount_micros=LIMIT)
    first_refusal = await core.reserve(refused)
    assert first_refusal.decision.reason is DenialReason.CREDIT_LIMIT_REACHED
    without = PriceTable({name: p for name, p in PRICES.models.items() if name != TOKENS})
    redeployed = make_core(prices=without)
    before = await snapshot(engine)
    assert await redeployed.reserve(command) == first
    assert await redeployed.reserve(refused) == first_refusal
    await raises(ErrorReason.REQUEST_ID_REUSED, redeployed.reserve(replace(command, user_id="bob")))
    # A new request for it is refused and stores nothing; its retry is refused the same way.
    fresh = Reserve("r3", "acme", "alice", TOKENS, ESTIMATE)
    not_offered = await redeployed.reserve(fresh)
    assert not_offered.decision.reason is DenialReason.MODEL_NOT_OFFERED
    assert await redeployed.reserve(fresh) == not_offered
    assert await snapshot(engine) == before
