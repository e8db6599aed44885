"""ReserveCredit in the general transaction: takes a hold if the admission rule admits it and the
budgets that apply leave room, else stores it as denied with the domain's reason, so that a
retry replays the same answer. postgres_hot_path runs the common case as one statement."""

from __future__ import annotations

from dataclasses import replace

from sqlalchemy.ext.asyncio import AsyncConnection

from billing_service.domain.budgets import DENIAL_REASONS, BudgetUsage, first_exhausted
from billing_service.domain.ledger import EntryKind
from billing_service.domain.model import DenialReason, Hold, HoldStatus, lifted_by_top_up
from billing_service.domain.policy import decide, explain_refusal
from billing_service.storage import budget_store
from billing_service.storage.ledger_rows import hold_row
from billing_service.storage.ledger_statements import (
    INSERT_HOLD,
    append_entry,
    get_account,
    move,
    take_hold_for,
)
from billing_service.storage.tenant_store import create_default_tenant, tenant_not_found


async def place_hold(
    conn: AsyncConnection,
    hold: Hold,
    create_with_limit: int | None,
    defer_credit_denial: bool,
    credit_denial_reason: DenialReason | None = None,
) -> Hold:
    assert hold.price is not None
    for _ in range(2):
        if hold.metered:
            taken = await take_hold_for(conn, hold)
            snapshot = None
            if taken is None:
                # No room when the UPDATE ran; by the next statement another call may have
                # freed some (READ COMMITTED). The denial is decided on the row read under its
                # lock, which stays as read until commit: room found there is taken, and a
                # denial reports exactly the availability it was decided on.
                snapshot = await get_account(conn, hold.tenant_id, lock=True)
                if (
                    snapshot is not None
                    and decide(snapshot, hold.model, hold.price, hold.amount_micros).allowed
                ):
                    taken = await take_hold_for(conn, hold)
            if taken is not None:
                account, budgeted = taken
                usages = (
                    await budget_store.locked_usages(
                        conn, hold.tenant_id, hold.user_id, hold.api_key_id, hold.created_at
                    )
                    if budgeted
                    else ()
                )
                exhausted = first_exhausted(usages, hold.amount_micros)
                if exhausted is not None:
                    return await _deny_by_budget(conn, hold, usages, exhausted)
                await budget_store.move_periods(conn, usages, held_delta=hold.amount_micros)
                stored = replace(
                    hold,
                    decision_available_micros=account.available_micros,
                    budgets=tuple(usage.after_hold(hold.amount_micros) for usage in usages),
                )
                await conn.execute(INSERT_HOLD, hold_row(stored))
                await append_entry(
                    conn,
                    account,
                    EntryKind.HOLD,
                    hold.created_at,
                    hold_id=hold.hold_id,
                    held_delta=hold.amount_micros,
                )
                return stored
        else:
            # An included model moves no money: the admission rule checks only the tenant's
            # status, on this read.
            snapshot = await get_account(conn, hold.tenant_id)
            if (
                snapshot is not None
                and decide(snapshot, hold.model, hold.price, hold.amount_micros).allowed
            ):
                stored = replace(
                    hold,
                    decision_available_micros=snapshot.available_micros,
                    budgets=await _budgets_now(conn, hold),
                )
                await conn.execute(INSERT_HOLD, hold_row(stored))
                return stored
        if snapshot is not None:
            # Kept so that a retry of this request replays the same denial.
            refusal = explain_refusal(snapshot, hold.model, hold.price, hold.amount_micros)
            denied = replace(
                hold,
                status=HoldStatus.DENIED,
                denial_reason=refusal.reason,
                decision_available_micros=refusal.available_micros,
                budgets=await _budgets_now(conn, hold),
            )
            if lifted_by_top_up(refusal.reason):
                if defer_credit_denial:
                    return denied
                if credit_denial_reason is not None:
                    denied = replace(denied, denial_reason=credit_denial_reason)
            await conn.execute(INSERT_HOLD, hold_row(denied))
            return denied
        if create_with_limit is None:
            raise tenant_not_found(hold.tenant_id)
        await create_default_tenant(conn, hold.tenant_id, create_with_limit, hold.created_at)
    raise AssertionError("a tenant created in this transaction cannot vanish")


async def _deny_by_budget(
    conn: AsyncConnection, hold: Hold, usages: tuple[BudgetUsage, ...], exhausted: BudgetUsage
) -> Hold:
    """Gives back the tenant hold just taken (same transaction, row still locked) and stores
    the denial, so that a retry replays it."""
    account = await move(conn, hold.tenant_id, 0, -hold.amount_micros)
    assert account is not None
    denied = replace(
        hold,
        status=HoldStatus.DENIED,
        denial_reason=DENIAL_REASONS[exhausted.budget.scope],
        decision_available_micros=account.available_micros,
        budgets=usages,
    )
    await conn.execute(INSERT_HOLD, hold_row(denied))
    return denied


async def _budgets_now(conn: AsyncConnection, hold: Hold) -> tuple[BudgetUsage, ...]:
    """The budgets of a call, read to explain a decision that takes nothing from them."""
    found = await budget_store.applicable_budgets(
        conn, hold.tenant_id, hold.user_id, hold.api_key_id
    )
    return tuple(
        [
            await budget_store.current_usage(conn, budget, hold.created_at, lock=False)
            for budget in found
        ]
    )
