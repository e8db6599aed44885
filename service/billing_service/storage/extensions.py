"""ExtendHold in the general transaction: grows an open hold by the price of more output tokens
when the admission rule and the budgets admit that amount, as for a reservation, and stores the
answer either way so that a retry replays it."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

from sqlalchemy import insert, update
from sqlalchemy.ext.asyncio import AsyncConnection

from billing_service.domain.budgets import DENIAL_REASONS, BudgetUsage, first_exhausted
from billing_service.domain.commands import ExtendHold
from billing_service.domain.ledger import EntryKind, check_extendable, extended, extension_answer
from billing_service.domain.model import DenialReason, Hold
from billing_service.domain.outcomes import ExtendOutcome
from billing_service.domain.policy import decide, explain_refusal
from billing_service.storage import budget_store
from billing_service.storage.ledger_rows import hold_from_row
from billing_service.storage.ledger_statements import (
    append_entry,
    get_account,
    locked_hold,
    move,
    take_hold,
)
from billing_service.storage.replays import prior_extension
from billing_service.storage.settlement import expire
from billing_service.storage.tables import hold_extensions, holds


async def extend_hold(
    conn: AsyncConnection,
    command: ExtendHold,
    request_fingerprint: str,
    ttl: timedelta,
    now: datetime,
) -> ExtendOutcome | None:
    """Grows the hold, or stores why not; expires it when it is due (returns None). Locks the
    hold, then its tenant, then the budget periods it took from: the order of a commit."""
    prior = await prior_extension(conn, command.request_id)
    if prior is not None:
        return prior
    hold = await locked_hold(conn, command.reservation_id)
    if not check_extendable(hold, command.reservation_id, now):
        assert hold is not None
        await expire(conn, hold_id=hold.hold_id, now=now)
        return None
    assert hold is not None
    assert hold.price is not None
    amount = hold.price.output_micros(command.additional_output_tokens)
    if hold.metered:
        account = await take_hold(conn, hold.tenant_id, amount)
        snapshot = None
        if account is None:
            # Decided on the row read under its lock, as for a reservation
            # (see reservations.place_hold).
            snapshot = await get_account(conn, hold.tenant_id, lock=True)
            assert snapshot is not None
            if decide(snapshot, hold.model, hold.price, amount).allowed:
                account = await take_hold(conn, hold.tenant_id, amount)
        if account is None:
            assert snapshot is not None
            refusal = explain_refusal(snapshot, hold.model, hold.price, amount)
            assert refusal.reason is not None
            usages = await budget_store.locked_hold_usages(conn, hold.budgets)
            return await _store_extension(
                conn,
                command,
                request_fingerprint,
                hold,
                amount,
                refusal.reason,
                refusal.available_micros,
                usages,
                now,
            )
        usages = await budget_store.locked_hold_usages(conn, hold.budgets)
        exhausted = first_exhausted(usages, amount)
        if exhausted is not None:
            # Gives back the tenant's part just taken (same transaction, row still locked).
            account = await move(conn, hold.tenant_id, 0, -amount)
            assert account is not None
            return await _store_extension(
                conn,
                command,
                request_fingerprint,
                hold,
                amount,
                DENIAL_REASONS[exhausted.budget.scope],
                account.available_micros,
                usages,
                now,
            )
        await budget_store.move_periods(conn, hold.budgets, held_delta=amount)
        usages = tuple(usage.after_hold(amount) for usage in usages)
    else:
        # An included model moves no money: only the tenant's status matters.
        unchanged = await get_account(conn, hold.tenant_id)
        assert unchanged is not None
        account = unchanged
        usages = ()
        decision = decide(account, hold.model, hold.price, amount)
        if decision.reason is not None:
            return await _store_extension(
                conn,
                command,
                request_fingerprint,
                hold,
                amount,
                decision.reason,
                account.available_micros,
                usages,
                now,
            )
    grown = extended(hold, amount, now, ttl)
    await conn.execute(
        update(holds)
        .where(holds.c.hold_id == hold.hold_id)
        .values(
            amount_micros=grown.amount_micros,
            extended_micros=grown.extended_micros,
            expires_at=grown.expires_at,
            granted_expires_at=grown.granted_expires_at,
        )
    )
    if amount:
        await append_entry(
            conn, account, EntryKind.EXTENSION, now, hold_id=hold.hold_id, held_delta=amount
        )
    return await _store_extension(
        conn,
        command,
        request_fingerprint,
        grown,
        amount,
        None,
        account.available_micros,
        usages,
        now,
    )


async def _store_extension(
    conn: AsyncConnection,
    command: ExtendHold,
    request_fingerprint: str,
    hold_after: Hold,
    required_micros: int,
    denial_reason: DenialReason | None,
    available_micros: int,
    usages: tuple[BudgetUsage, ...],
    now: datetime,
) -> ExtendOutcome:
    """Keeps the answer so that a retry of the request replays it."""
    await conn.execute(
        insert(hold_extensions).values(
            request_id=command.request_id,
            request_fingerprint=request_fingerprint,
            hold_id=hold_after.hold_id,
            tenant_id=hold_after.tenant_id,
            required_micros=required_micros,
            denial_reason=denial_reason,
            amount_after_micros=hold_after.amount_micros,
            expires_at_after=hold_after.expires_at,
            decision_available_micros=available_micros,
            budgets=budget_store.usages_to_json(usages),
            created_at=now,
        )
    )
    return ExtendOutcome(
        extension_answer(hold_after, hold_after.amount_micros, hold_after.expires_at),
        required_micros,
        denial_reason,
        available_micros,
        usages,
        request_fingerprint,
    )


def extension_granted(row: Mapping[str, Any], request_fingerprint: str) -> ExtendOutcome:
    """The answer of the one-statement extension (postgres_hot_path.HotPath.extend) from the
    hold's row as it grew it: what _store_extension answers for a hold without budgets."""
    grown = hold_from_row(SimpleNamespace(**row))
    return ExtendOutcome(
        extension_answer(grown, grown.amount_micros, grown.expires_at),
        int(row["required_micros"]),
        None,
        int(row["available_after_micros"]),
        (),
        request_fingerprint,
    )
