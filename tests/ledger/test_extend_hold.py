"""Holds that grow: ExtendHold adds the price of more output tokens to an open hold, decided as
a reservation of that amount is (tenant status and billing, available credit, the budgets the
hold took from), moves its expire time, and replays by request_id. On SQLite and PostgreSQL; the
`make_core` fixture audits the books after each test.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_service.budget_core import BudgetCore
from billing_service.core import BillingCore
from billing_service.domain.budgets import BudgetPeriod, BudgetScope, SetBudget
from billing_service.domain.commands import (
    Commit,
    ExtendHold,
    GrantCredit,
    QueryEstimate,
    Release,
    Reserve,
    UpdateTenant,
)
from billing_service.domain.errors import ErrorReason, InvalidArgument
from billing_service.domain.model import DenialReason, HoldStatus, TenantStatus
from billing_service.domain.page_tokens import PageTokens
from billing_service.domain.payments import BillingStatus
from billing_service.domain.pricing import TOKENS_MAX, TokenUsage
from billing_service.storage.budget_store import BudgetStore
from billing_service.storage.ledger_store import LedgerStore
from billing_service.storage.tables import budget_periods, tenants
from tests.ledger.books import entry_kinds, money, snapshot
from tests.ledger.conftest import INCLUDED, START, TOKENS
from tests.ledger.test_ledger import (
    ESTIMATE_HOLD,
    LIMIT,
    UNKNOWN_RSV,
    granted,
    new_tenant,
    raises,
)
from tests.support.clock import FakeClock

# TOKENS output costs 15 micros a token: 500 more tokens are 7,500 micros.
MORE = 500
MORE_MICROS = 7_500
# The ESTIMATE hold (1,000 input, 500 output) after 100 output tokens were streamed: 3,000 for
# the input and 1,500 for those tokens are spent, 6,000 left = 400 more tokens.
SO_FAR = TokenUsage(1_000, 0, 100)
COVERED_SO_FAR = 400


def extend(
    request_id: str,
    hold_id: str,
    tokens: int = MORE,
    usage: TokenUsage = SO_FAR,
    ttl: timedelta | None = None,
) -> ExtendHold:
    return ExtendHold(request_id, hold_id, tokens, usage, ttl)


async def test_a_granted_extension_grows_the_hold_and_moves_its_expire_time(
    core: BillingCore, engine: AsyncEngine, clock: FakeClock
) -> None:
    await new_tenant(core)
    hold = await granted(core, "r1")
    assert hold.expires_at == START + timedelta(minutes=5)
    clock.advance(seconds=200)

    result = await core.extend_hold(extend("e1", hold.hold_id))

    assert result.decision.allowed
    assert result.decision.required_micros == MORE_MICROS
    assert result.decision.available_micros == LIMIT - ESTIMATE_HOLD - MORE_MICROS
    assert result.extended_micros == MORE_MICROS
    assert result.hold.amount_micros == ESTIMATE_HOLD + MORE_MICROS
    assert result.hold.expires_at == clock.now + timedelta(minutes=5)
    assert result.covered_output_tokens == COVERED_SO_FAR + MORE
    assert await money(engine, "acme") == (0, ESTIMATE_HOLD + MORE_MICROS)
    assert await entry_kinds(engine, "acme") == ["hold", "extension"]

    # Commit settles the real counts, inside the grown hold: all 900 output tokens are charged.
    usage = TokenUsage(1_000, 0, 900)
    outcome = await core.commit(Commit("c1", hold.hold_id, usage))
    assert outcome.record.cost_micros == 3_000 + 13_500
    assert outcome.record.charged_micros == 16_500
    assert outcome.record.uncollected_micros == 0
    assert outcome.record.held_micros == ESTIMATE_HOLD + MORE_MICROS
    assert await money(engine, "acme") == (-16_500, 0)


async def test_an_extension_never_moves_the_expire_time_earlier(
    core: BillingCore, clock: FakeClock
) -> None:
    await new_tenant(core)
    hold = await granted(core, "r1", ttl=timedelta(hours=1))
    result = await core.extend_hold(extend("e1", hold.hold_id, ttl=timedelta(seconds=30)))
    assert result.decision.allowed
    assert result.hold.expires_at == START + timedelta(hours=1)
    clock.advance(minutes=59)
    later = await core.extend_hold(extend("e2", hold.hold_id, ttl=timedelta(seconds=600)))
    assert later.hold.expires_at == clock.now + timedelta(seconds=600)


async def test_a_retry_replays_the_answer_and_a_reused_request_id_is_refused(
    core: BillingCore, engine: AsyncEngine, clock: FakeClock
) -> None:
    await new_tenant(core)
    hold = await granted(core, "r1")
    command = extend("e1", hold.hold_id)
    first = await core.extend_hold(command)
    before = await snapshot(engine)

    clock.advance(seconds=10)
    assert await core.extend_hold(command) == first
    assert await snapshot(engine) == before
    # Still the first answer once the hold is committed.
    await core.commit(Commit("c1", hold.hold_id, SO_FAR))
    assert await core.extend_hold(command) == first

    for other in (
        extend("e1", hold.hold_id, tokens=MORE + 1),
        extend("e1", hold.hold_id, usage=TokenUsage()),
        extend("e1", hold.hold_id, ttl=timedelta(seconds=60)),
    ):
        await raises(ErrorReason.REQUEST_ID_REUSED, core.extend_hold(other))
    assert await entry_kinds(engine, "acme") == ["hold", "extension", "debit"]


async def test_the_reservation_replays_as_granted_after_extensions(
    core: BillingCore, clock: FakeClock
) -> None:
    await new_tenant(core)
    reserve = Reserve("r1", "acme", "alice", TOKENS, QueryEstimate(1_000, 500))
    first = await core.reserve(reserve)
    assert first.hold is not None
    clock.advance(seconds=100)
    await core.extend_hold(extend("e1", first.hold.hold_id))
    await core.extend_hold(extend("e2", first.hold.hold_id))
    assert await core.reserve(reserve) == first


async def test_an_extension_that_does_not_fit_the_credit_is_denied_and_changes_nothing(
    core: BillingCore, engine: AsyncEngine, clock: FakeClock
) -> None:
    await new_tenant(core, limit=ESTIMATE_HOLD + MORE_MICROS - 1)
    hold = await granted(core, "r1")
    before = await snapshot(engine)
    clock.advance(seconds=30)

    denied = await core.extend_hold(extend("e1", hold.hold_id))

    assert not denied.decision.allowed
    assert denied.decision.reason is DenialReason.CREDIT_LIMIT_REACHED
    assert denied.decision.available_micros == MORE_MICROS - 1
    assert denied.decision.required_micros == MORE_MICROS
    assert denied.extended_micros == 0
    assert denied.hold.amount_micros == ESTIMATE_HOLD
    assert denied.hold.expires_at == hold.expires_at
    # The caller may stream 400 more tokens, then commits.
    assert denied.covered_output_tokens == COVERED_SO_FAR
    assert await snapshot(engine) == before

    # A smaller extension fits; a retry of the denied one still replays the denial.
    smaller = await core.extend_hold(extend("e2", hold.hold_id, tokens=MORE - 1))
    assert smaller.decision.allowed
    assert smaller.decision.available_micros == 14
    await core.grant_credit(GrantCredit("g1", "acme", 1_000_000, "top up"))
    assert await core.extend_hold(extend("e1", hold.hold_id)) == denied
    usage = TokenUsage(1_000, 0, 100 + COVERED_SO_FAR + MORE - 1)
    outcome = await core.commit(Commit("c1", hold.hold_id, usage))
    assert outcome.record.uncollected_micros == 0
    assert outcome.record.charged_micros == outcome.record.held_micros


async def test_a_tenant_that_may_not_reserve_may_not_extend(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await new_tenant(core)
    hold = await granted(core, "r1")
    included = await granted(core, "r2", model=INCLUDED)
    await core.update_tenant(UpdateTenant("u1", "acme", status=TenantStatus.SUSPENDED))
    for request_id, hold_id in (("e1", hold.hold_id), ("e2", included.hold_id)):
        denied = await core.extend_hold(extend(request_id, hold_id))
        assert denied.decision.reason is DenialReason.ACCOUNT_SUSPENDED
    await core.update_tenant(UpdateTenant("u2", "acme", status=TenantStatus.ACTIVE))
    async with engine.begin() as conn:
        await conn.execute(
            tenants.update().values(billing_status=BillingStatus.PAYMENT_FAILED.value)
        )
    denied = await core.extend_hold(extend("e3", hold.hold_id))
    assert denied.decision.reason is DenialReason.PAYMENT_FAILED
    # Included models keep working.
    assert (await core.extend_hold(extend("e4", included.hold_id))).decision.allowed
    assert await money(engine, "acme") == (0, ESTIMATE_HOLD)


async def test_an_extension_fits_in_the_budgets_the_hold_took_from(
    core: BillingCore, engine: AsyncEngine, clock: FakeClock
) -> None:
    await new_tenant(core)
    budgets = BudgetCore(BudgetStore(engine), clock, PageTokens.random())
    await budgets.set_budget(
        SetBudget("b1", "acme", BudgetScope.USER, "alice", 20_000, BudgetPeriod.MONTH)
    )
    hold = await granted(core, "r1")

    fits = await core.extend_hold(extend("e1", hold.hold_id, tokens=600))  # 9,000 of 9,500
    assert fits.decision.allowed
    assert [usage.remaining_micros for usage in fits.decision.budgets] == [500]
    denied = await core.extend_hold(extend("e2", hold.hold_id, tokens=34))  # 510
    assert denied.decision.reason is DenialReason.USER_BUDGET_EXHAUSTED
    assert denied.decision.exhausted_budget is not None
    assert denied.decision.exhausted_budget.remaining_micros == 500
    assert denied.decision.available_micros == LIMIT - ESTIMATE_HOLD - 9_000
    async with engine.connect() as conn:
        held = (await conn.execute(select(budget_periods.c.held_micros))).scalars().all()
    assert held == [ESTIMATE_HOLD + 9_000]

    # A higher limit applies to the next extension of the same hold.
    await budgets.set_budget(
        SetBudget("b2", "acme", BudgetScope.USER, "alice", 30_000, BudgetPeriod.MONTH)
    )
    assert (await core.extend_hold(extend("e3", hold.hold_id, tokens=34))).decision.allowed
    await core.commit(Commit("c1", hold.hold_id, TokenUsage(1_000, 0, 1_000)))


@pytest.mark.parametrize(
    ("settle", "reason"),
    [
        ("commit", ErrorReason.HOLD_ALREADY_COMMITTED),
        ("release", ErrorReason.HOLD_RELEASED),
        ("expire", ErrorReason.HOLD_EXPIRED),
    ],
)
async def test_only_an_open_unexpired_hold_grows(
    core: BillingCore, engine: AsyncEngine, clock: FakeClock, settle: str, reason: ErrorReason
) -> None:
    await new_tenant(core)
    hold = await granted(core, "r1", ttl=timedelta(seconds=10))
    if settle == "commit":
        await core.commit(Commit("c1", hold.hold_id, SO_FAR))
    elif settle == "release":
        await core.release(Release("l1", hold.hold_id))
    else:
        clock.advance(seconds=10)  # due, not swept yet: the extension expires it
    before = await entry_kinds(engine, "acme")

    await raises(reason, core.extend_hold(extend("e1", hold.hold_id)))
    await raises(reason, core.extend_hold(extend("e1", hold.hold_id)))

    stored = await LedgerStore(engine).get_hold(hold.hold_id)
    assert stored is not None
    assert stored.amount_micros == ESTIMATE_HOLD
    assert await money(engine, "acme") == ((-4_500, 0) if settle == "commit" else (0, 0))
    if settle == "expire":
        assert stored.status is HoldStatus.EXPIRED
        assert await entry_kinds(engine, "acme") == ["hold", "expiry"]
    else:
        assert await entry_kinds(engine, "acme") == before
    await raises(ErrorReason.RESERVATION_NOT_FOUND, core.extend_hold(extend("e2", UNKNOWN_RSV)))


async def test_an_included_hold_grows_for_free(core: BillingCore, engine: AsyncEngine) -> None:
    await new_tenant(core)
    hold = await granted(core, "r1", model=INCLUDED)
    result = await core.extend_hold(extend("e1", hold.hold_id, tokens=TOKENS_MAX))
    assert result.decision.allowed
    assert (result.extended_micros, result.hold.amount_micros) == (0, 0)
    assert result.covered_output_tokens == TOKENS_MAX
    assert await entry_kinds(engine, "acme") == []


@pytest.mark.parametrize(
    ("command", "field"),
    [
        (ExtendHold("", "rsv_" + "0" * 32, 1), "request_id"),
        (ExtendHold("e1", "rsv_nope", 1), "reservation_id"),
        (ExtendHold("e1", UNKNOWN_RSV, 0), "additional_output_tokens"),
        (ExtendHold("e1", UNKNOWN_RSV, TOKENS_MAX + 1), "additional_output_tokens"),
        (ExtendHold("e1", UNKNOWN_RSV, 1, TokenUsage(-1, 0, 0)), "usage.input_tokens"),
        (ExtendHold("e1", UNKNOWN_RSV, 1, TokenUsage(0, 0, TOKENS_MAX + 1)), "usage.output_tokens"),
        (ExtendHold("e1", UNKNOWN_RSV, 1, ttl=timedelta(0)), "ttl"),
        (ExtendHold("e1", UNKNOWN_RSV, 1, ttl=timedelta(hours=2)), "ttl"),
    ],
)
async def test_bad_input_names_the_field(
    core: BillingCore, command: ExtendHold, field: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await core.extend_hold(command)
    assert raised.value.field == field
