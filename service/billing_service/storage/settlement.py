"""How a hold settles: Commit (debit the cost, within the cap), Release, Refund of part of a
committed charge, and expiry of a hold whose expire time has passed. Which of them a hold in a
given state allows is decided in domain.ledger."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from billing_service.domain.commands import Commit, Refund
from billing_service.domain.errors import FailedPrecondition
from billing_service.domain.ledger import (
    EntryKind,
    ReleaseAction,
    Settlement,
    check_committable,
    check_refundable,
    covered_by_hold,
    decide_release,
    held_by,
    held_micros,
    refund_amount,
    settle,
)
from billing_service.domain.model import Account, Hold, PaymentSource, UsageRecord
from billing_service.domain.outcomes import CommitOutcome, RefundOutcome
from billing_service.domain.pricing import ModelBilling
from billing_service.storage import budget_store
from billing_service.storage.ledger_rows import account_from_row, hold_from_row, usage_row
from billing_service.storage.ledger_statements import (
    CLAIM_FOR_COMMIT,
    EXPIRE_HOLD,
    INSERT_USAGE_RECORD,
    LOCKED_ACCOUNT,
    RELEASE_HOLD,
    append_entry,
    get_account,
    get_hold,
    locked_hold,
    move,
)
from billing_service.storage.replays import prior_commit, prior_refund
from billing_service.storage.rollups import add_to_rollup
from billing_service.storage.tables import holds, usage_records


async def commit(
    conn: AsyncConnection, command: Commit, request_fingerprint: str, now: datetime
) -> CommitOutcome:
    params = {"hold": command.reservation_id, "at": now}
    claimed = (await conn.execute(CLAIM_FOR_COMMIT, params)).one_or_none()
    if claimed is None:
        prior = await prior_commit(conn, command.request_id)
        if prior is not None:
            return prior
        check_committable(await get_hold(conn, command.reservation_id), command.reservation_id, now)
        raise AssertionError("an open, unexpired hold is always claimable")
    hold = hold_from_row(claimed)
    assert hold.price is not None
    cost = hold.price.cost_micros(command.usage)
    if hold.metered:
        settlement, account = await _debit(conn, hold, cost)
        await append_entry(
            conn,
            account,
            EntryKind.DEBIT,
            now,
            hold_id=hold.hold_id,
            balance_delta=-settlement.charged_micros,
            held_delta=-hold.amount_micros,
        )
        source = PaymentSource.CREDIT
    else:
        settlement = Settlement(charged_micros=0, uncollected_micros=0)
        unchanged = await get_account(conn, hold.tenant_id)
        assert unchanged is not None
        account = unchanged
        source = PaymentSource.INCLUDED
    record = UsageRecord(
        hold_id=hold.hold_id,
        tenant_id=hold.tenant_id,
        user_id=hold.user_id,
        model=hold.model,
        usage=command.usage,
        cost_micros=cost,
        charged_micros=settlement.charged_micros,
        uncollected_micros=settlement.uncollected_micros,
        held_micros=hold.amount_micros,
        payment_source=source,
        reserved_at=hold.created_at,
        committed_at=now,
        request_id=command.request_id,
        request_fingerprint=request_fingerprint,
    )
    await conn.execute(
        INSERT_USAGE_RECORD,
        {**usage_row(record), "available_after_micros": account.available_micros},
    )
    await add_to_rollup(conn, record)
    return CommitOutcome(record, account.available_micros)


async def _debit(conn: AsyncConnection, hold: Hold, cost_micros: int) -> tuple[Settlement, Account]:
    """Releases the hold and debits the cost, capped so the tenant never passes its limit."""
    if covered_by_hold(hold, cost_micros):
        # Within the hold: it was granted inside the cap, so no read is needed to decide.
        settlement = settle(hold, cost_micros, 0)
    else:
        before = (await conn.execute(LOCKED_ACCOUNT, {"tenant": hold.tenant_id})).one()
        room = account_from_row(before).available_micros
        # A budget is overshot no more than the tenant: above the hold, only what fits in
        # every budget it took from is charged too.
        room = min((room, *await budget_store.relock(conn, hold.budgets)))
        settlement = settle(hold, cost_micros, room)
    account = await move(conn, hold.tenant_id, -settlement.charged_micros, -hold.amount_micros)
    assert account is not None
    await budget_store.move_periods(
        conn,
        hold.budgets,
        spent_delta=settlement.charged_micros,
        held_delta=-hold.amount_micros,
    )
    return settlement, account


async def release(
    conn: AsyncConnection,
    request_id: str,
    reservation_id: str,
    reason: str,
    request_fingerprint: str,
    now: datetime,
) -> RefundOutcome | None:
    """Releases the hold, or expires it when it is due (returns None); a replay returns the
    stored answer."""
    hold = await locked_hold(conn, reservation_id)
    try:
        action = decide_release(hold, reservation_id, now)
    except FailedPrecondition:
        # A retry of a release that already happened finds the hold in its new state.
        prior = await prior_refund(conn, request_id)
        if prior is not None:
            return prior
        raise
    assert hold is not None
    if action is ReleaseAction.EXPIRE:
        # A request_id already used for something else is refused before anything changes.
        prior = await prior_refund(conn, request_id)
        if prior is not None:
            return prior
        await expire(conn, hold_id=hold.hold_id, now=now)
        return None
    await conn.execute(RELEASE_HOLD, {"hold": hold.hold_id, "at": now})
    released = held_micros(hold)
    account = await move(conn, hold.tenant_id, 0, -released)
    assert account is not None
    if hold.metered:
        await budget_store.move_periods(conn, hold.budgets, held_delta=-released)
    await append_entry(
        conn,
        account,
        EntryKind.RELEASE,
        now,
        hold_id=hold.hold_id,
        held_delta=-released,
        request_id=request_id,
        request_fingerprint=request_fingerprint,
        memo=reason or None,
    )
    return RefundOutcome(
        EntryKind.RELEASE, released, account.available_micros, 0, request_fingerprint
    )


async def refund(
    conn: AsyncConnection, command: Refund, request_fingerprint: str, now: datetime
) -> RefundOutcome:
    hold = await locked_hold(conn, command.reservation_id)
    try:
        committed = check_refundable(
            hold, command.reservation_id, now, refund_all=command.refund_all
        )
        return await _refund_charge(conn, committed, command, request_fingerprint, now)
    except FailedPrecondition:
        # A retry of a refund that already happened finds less left to refund.
        prior = await prior_refund(conn, command.request_id)
        if prior is not None:
            return prior
        raise


async def _refund_charge(
    conn: AsyncConnection, hold: Hold, command: Refund, request_fingerprint: str, now: datetime
) -> RefundOutcome:
    charged = (
        await conn.execute(
            select(usage_records.c.charged_micros).where(usage_records.c.hold_id == hold.hold_id)
        )
    ).scalar_one()
    amount = refund_amount(hold, charged, command.amount_micros, command.refund_all)
    await conn.execute(
        update(holds)
        .where(holds.c.hold_id == hold.hold_id)
        .values(refunded_micros=holds.c.refunded_micros + amount)
    )
    account = await move(conn, hold.tenant_id, amount, 0)
    assert account is not None
    await budget_store.move_periods(conn, hold.budgets, spent_delta=-amount)
    await append_entry(
        conn,
        account,
        EntryKind.REFUND,
        now,
        hold_id=hold.hold_id,
        balance_delta=amount,
        request_id=command.request_id,
        request_fingerprint=request_fingerprint,
        memo=command.reason or None,
    )
    return RefundOutcome(
        EntryKind.REFUND,
        amount,
        account.available_micros,
        hold.refunded_micros + amount,
        request_fingerprint,
    )


async def expire(conn: AsyncConnection, *, hold_id: str, now: datetime) -> int:
    row = (await conn.execute(EXPIRE_HOLD, {"hold": hold_id, "at": now})).one_or_none()
    if row is None:
        return 0
    billing = None if row.billing is None else ModelBilling(row.billing)
    released = held_by(billing, row.amount_micros)
    if released:
        account = await move(conn, row.tenant_id, 0, -released)
        assert account is not None
        await budget_store.move_periods(
            conn, budget_store.usages_from_json(row.budgets), held_delta=-released
        )
        await append_entry(
            conn, account, EntryKind.EXPIRY, now, hold_id=hold_id, held_delta=-released
        )
    return 1
