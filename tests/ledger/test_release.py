"""Release and Refund are different requests: a release only ever gives back an open, unexpired
hold; a refund only ever gives back part of a committed charge. On SQLite and PostgreSQL, on the
one-statement path and the general transaction.

A Refund without an amount (the shape earlier clients sent to release) is a release with exactly
Release's semantics: on a committed hold it refunds nothing.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_service.budget_core import BudgetCore
from billing_service.core import BillingCore
from billing_service.domain.budgets import BudgetPeriod, BudgetScope, SetBudget
from billing_service.domain.commands import Commit, Refund, Release, fingerprint
from billing_service.domain.errors import ErrorReason, FailedPrecondition, InvalidArgument
from billing_service.domain.ledger import EntryKind
from billing_service.domain.model import HoldStatus
from billing_service.domain.outcomes import CommitOutcome, ReleaseOutcome
from billing_service.storage.budget_store import BudgetStore
from billing_service.storage.ledger_store import LedgerStore
from billing_service.storage.tables import budget_periods, ledger_entries
from tests.ledger.books import assert_books_balance, entry_kinds, money, snapshot
from tests.ledger.conftest import FLAT, INCLUDED
from tests.ledger.test_ledger import (
    ESTIMATE_HOLD,
    LIMIT,
    UNKNOWN_RSV,
    USAGE,
    USAGE_COST,
    granted,
    new_tenant,
    raises,
)
from tests.support.clock import FakeClock


def legacy_release(request_id: str, reservation_id: str, reason: str = "") -> Refund:
    """What clients before Release sent to give a hold back: a Refund without an amount."""
    return Refund(request_id, reservation_id, 0, reason)


async def test_a_release_never_refunds_a_committed_charge(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await new_tenant(core)
    hold = await granted(core, "r1")
    await core.commit(Commit("c1", hold.hold_id, USAGE))
    before = await snapshot(engine)

    await raises(
        ErrorReason.HOLD_ALREADY_COMMITTED, core.refund(legacy_release("f1", hold.hold_id))
    )
    await raises(ErrorReason.HOLD_ALREADY_COMMITTED, core.release(Release("l1", hold.hold_id)))

    assert await snapshot(engine) == before
    assert await money(engine, "acme") == (-USAGE_COST, 0)
    assert await entry_kinds(engine, "acme") == ["hold", "debit"]


async def test_release_gives_the_whole_hold_back_and_replays(
    core: BillingCore, engine: AsyncEngine, clock: FakeClock
) -> None:
    await new_tenant(core)
    hold = await granted(core, "r1")
    clock.advance(seconds=1)
    command = Release("l1", hold.hold_id, "model timed out")
    outcome = await core.release(command)
    assert outcome == ReleaseOutcome(ESTIMATE_HOLD, LIMIT, fingerprint(command))
    assert await money(engine, "acme") == (0, 0)

    before = await snapshot(engine)
    assert await core.release(command) == outcome
    await raises(ErrorReason.REQUEST_ID_REUSED, core.release(Release("l1", hold.hold_id, "x")))
    # The same request id through the other RPC is another request.
    await raises(ErrorReason.REQUEST_ID_REUSED, core.refund(legacy_release("l1", hold.hold_id)))
    await raises(ErrorReason.HOLD_RELEASED, core.release(Release("l2", hold.hold_id)))
    await raises(ErrorReason.RESERVATION_NOT_FOUND, core.release(Release("l3", UNKNOWN_RSV)))
    assert await snapshot(engine) == before
    async with engine.connect() as conn:
        memo = (
            await conn.execute(
                select(ledger_entries.c.memo).where(ledger_entries.c.kind == "release")
            )
        ).scalar_one()
    assert memo == "model timed out"


async def test_release_of_an_included_hold_moves_no_money(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await new_tenant(core)
    hold = await granted(core, "r1", model=INCLUDED)
    command = Release("l1", hold.hold_id)
    assert await core.release(command) == ReleaseOutcome(0, LIMIT, fingerprint(command))
    assert await core.release(command) == ReleaseOutcome(0, LIMIT, fingerprint(command))
    assert await money(engine, "acme") == (0, 0)


async def set_user_budget(engine: AsyncEngine, clock: FakeClock) -> None:
    budgets = BudgetCore(BudgetStore(engine), clock)
    await budgets.set_budget(
        SetBudget("b1", "acme", BudgetScope.USER, "alice", 1_000_000, BudgetPeriod.MONTH)
    )


@pytest.mark.parametrize("via", ["Release", "Refund without an amount"])
@pytest.mark.parametrize("kind", ["metered", "metered with a budget", "included"])
async def test_a_release_after_the_expire_time_is_an_expiry(
    core: BillingCore, engine: AsyncEngine, clock: FakeClock, via: str, kind: str
) -> None:
    await new_tenant(core)
    if kind == "metered with a budget":
        await set_user_budget(engine, clock)
    model = INCLUDED if kind == "included" else FLAT
    hold = await granted(core, "r1", model=model, ttl=timedelta(seconds=10))
    held = 0 if kind == "included" else 250_000
    assert await money(engine, "acme") == (0, held)
    clock.advance(seconds=10)  # exactly its expire time: due, not swept yet

    def release(request_id: str) -> object:
        if via == "Release":
            return core.release(Release(request_id, hold.hold_id, "late"))
        return core.refund(legacy_release(request_id, hold.hold_id, "late"))

    error = await raises(ErrorReason.HOLD_EXPIRED, release("l1"))  # type: ignore[arg-type]
    assert isinstance(error, FailedPrecondition)
    stored = await LedgerStore(engine).get_hold(hold.hold_id)
    assert stored is not None
    assert (stored.status, stored.settled_at) == (HoldStatus.EXPIRED, clock.now)
    assert await money(engine, "acme") == (0, 0)
    # Exactly what the sweep writes: one expiry entry of the whole hold, with no request id.
    async with engine.connect() as conn:
        entries = (
            await conn.execute(
                select(
                    ledger_entries.c.kind,
                    ledger_entries.c.held_delta_micros,
                    ledger_entries.c.request_id,
                    ledger_entries.c.memo,
                ).order_by(ledger_entries.c.entry_id)
            )
        ).all()
        periods = (await conn.execute(select(budget_periods.c.held_micros))).scalars().all()
    if kind == "included":
        assert entries == []
    else:
        assert [tuple(entry) for entry in entries] == [
            ("hold", held, None, None),
            ("expiry", -held, None, None),
        ]
    assert all(period == 0 for period in periods)

    before = await snapshot(engine)
    await raises(ErrorReason.HOLD_EXPIRED, release("l1"))  # type: ignore[arg-type]
    await raises(ErrorReason.HOLD_EXPIRED, release("l2"))  # type: ignore[arg-type]
    assert await core.release_expired() == 0
    assert await snapshot(engine) == before


async def test_a_release_just_before_the_expire_time_releases(
    core: BillingCore, engine: AsyncEngine, clock: FakeClock
) -> None:
    await new_tenant(core)
    hold = await granted(core, "r1", ttl=timedelta(seconds=10))
    clock.advance(seconds=9)
    outcome = await core.release(Release("l1", hold.hold_id))
    assert outcome.released_micros == ESTIMATE_HOLD
    assert await entry_kinds(engine, "acme") == ["hold", "release"]


async def test_refund_refunds_only_a_committed_charge(
    core: BillingCore, engine: AsyncEngine, clock: FakeClock
) -> None:
    await new_tenant(core)
    hold = await granted(core, "r1", ttl=timedelta(seconds=10))
    before = await snapshot(engine)
    await raises(
        ErrorReason.PARTIAL_RELEASE_NOT_ALLOWED, core.refund(Refund("f1", hold.hold_id, 1))
    )
    await raises(
        ErrorReason.HOLD_NOT_COMMITTED,
        core.refund(Refund("f2", hold.hold_id, refund_all=True)),
    )
    with pytest.raises(InvalidArgument) as both:
        await core.refund(Refund("f3", hold.hold_id, 5, refund_all=True))
    assert both.value.field == "amount_micros"
    # Past its expire time and not swept yet: a refund says so and leaves it to the sweep.
    clock.advance(seconds=10)
    await raises(ErrorReason.HOLD_EXPIRED, core.refund(Refund("f4", hold.hold_id, refund_all=True)))
    await raises(ErrorReason.HOLD_EXPIRED, core.refund(Refund("f5", hold.hold_id, 1)))
    assert await snapshot(engine) == before

    committed = await granted(core, "r2")
    await core.commit(Commit("c2", committed.hold_id, USAGE))
    part = await core.refund(Refund("f6", committed.hold_id, 1_000))
    rest = await core.refund(Refund("f7", committed.hold_id, refund_all=True))
    assert (rest.kind, rest.amount_micros, rest.refunded_total_micros) == (
        EntryKind.REFUND,
        USAGE_COST - 1_000,
        USAGE_COST,
    )
    assert part.refunded_total_micros == 1_000
    await raises(
        ErrorReason.REFUND_EXCEEDS_CHARGE,
        core.refund(Refund("f8", committed.hold_id, refund_all=True)),
    )

    released = await granted(core, "r3")
    await core.release(Release("l3", released.hold_id))
    await raises(
        ErrorReason.HOLD_RELEASED, core.refund(Refund("f9", released.hold_id, refund_all=True))
    )
    await raises(ErrorReason.HOLD_RELEASED, core.refund(Refund("f10", released.hold_id, 1)))


async def test_a_commit_and_a_release_of_one_hold_racing_settle_it_once(
    core: BillingCore, engine: AsyncEngine
) -> None:
    """Many rounds of a Commit, a Release and a Refund without an amount of the same hold at
    once (really concurrent on PostgreSQL, serialized on SQLite): exactly one of the commit and
    the releases wins, and nothing is ever refunded."""
    await new_tenant(core)
    for round_number in range(30):
        hold = await granted(core, f"r{round_number}")
        answers = await asyncio.gather(
            core.commit(Commit(f"c{round_number}", hold.hold_id, USAGE)),
            core.release(Release(f"l{round_number}", hold.hold_id)),
            core.refund(legacy_release(f"f{round_number}", hold.hold_id)),
            return_exceptions=True,
        )
        winners = [answer for answer in answers if not isinstance(answer, BaseException)]
        assert len(winners) == 1, answers
        losers = [answer for answer in answers if isinstance(answer, FailedPrecondition)]
        assert len(losers) == 2, answers
        if isinstance(winners[0], CommitOutcome):
            expected = {ErrorReason.HOLD_ALREADY_COMMITTED}
        else:
            expected = {ErrorReason.HOLD_RELEASED}
        assert {loser.reason for loser in losers} == expected, answers
    kinds = await entry_kinds(engine, "acme")
    assert "refund" not in kinds
    assert kinds.count("hold") == 30
    assert kinds.count("debit") + kinds.count("release") == 30
    await assert_books_balance(engine)


async def test_a_late_release_racing_the_sweep_expires_the_hold_once(
    core: BillingCore, engine: AsyncEngine, clock: FakeClock
) -> None:
    await new_tenant(core)
    for round_number in range(10):
        hold = await granted(core, f"r{round_number}", model=FLAT, ttl=timedelta(seconds=1))
        clock.advance(seconds=1)
        answers = await asyncio.gather(
            core.release(Release(f"l{round_number}", hold.hold_id)),
            core.release_expired(),
            core.refund(legacy_release(f"f{round_number}", hold.hold_id)),
            return_exceptions=True,
        )
        released, swept, refunded = answers
        assert isinstance(released, FailedPrecondition), answers
        assert isinstance(refunded, FailedPrecondition), answers
        assert (released.reason, refunded.reason) == (ErrorReason.HOLD_EXPIRED,) * 2
        assert swept in (0, 1)
    kinds = await entry_kinds(engine, "acme")
    assert (kinds.count("hold"), kinds.count("expiry"), len(kinds)) == (10, 10, 20)
    assert await money(engine, "acme") == (0, 0)
