"""The stored answers of requests already made, found by their request_id: a retry of Commit,
ExtendHold, Release, Refund, GrantCredit or a tenant admin request returns what the first one
answered (AIP-155)."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from billing_service.domain.ledger import EntryKind, extension_answer
from billing_service.domain.model import DenialReason
from billing_service.domain.outcomes import (
    CommitOutcome,
    ExtendOutcome,
    GrantOutcome,
    RefundOutcome,
    TenantOutcome,
)
from billing_service.storage import budget_store
from billing_service.storage.ledger_rows import account_from_json, balance_after, usage_from_row
from billing_service.storage.ledger_statements import (
    USAGE_RECORD_BY_REQUEST,
    entry_by_request,
    get_hold,
)
from billing_service.storage.tables import admin_requests, hold_extensions, ledger_entries


async def prior_commit(conn: AsyncConnection, request_id: str) -> CommitOutcome | None:
    row = (await conn.execute(USAGE_RECORD_BY_REQUEST, {"request": request_id})).one_or_none()
    if row is None:
        return None
    return CommitOutcome(usage_from_row(row), row.available_after_micros)


async def prior_refund(conn: AsyncConnection, request_id: str) -> RefundOutcome | None:
    entry = await entry_by_request(conn, request_id)
    if entry is None:
        return None
    kind = EntryKind(entry.kind)
    if kind not in (EntryKind.RELEASE, EntryKind.REFUND):
        # The request_id was used by another kind of call: report it as reused.
        return RefundOutcome(kind, 0, 0, 0, entry.request_fingerprint or "")
    refunded_total = 0
    if kind is EntryKind.REFUND:
        refunded_total = (
            await conn.execute(
                select(func.coalesce(func.sum(ledger_entries.c.balance_delta_micros), 0)).where(
                    ledger_entries.c.hold_id == entry.hold_id,
                    ledger_entries.c.kind == EntryKind.REFUND,
                    ledger_entries.c.entry_id <= entry.entry_id,
                )
            )
        ).scalar_one()
    amount = entry.balance_delta_micros if kind is EntryKind.REFUND else -entry.held_delta_micros
    return RefundOutcome(
        kind,
        amount,
        entry.available_after_micros,
        int(refunded_total),
        entry.request_fingerprint or "",
    )


async def prior_extension(conn: AsyncConnection, request_id: str) -> ExtendOutcome | None:
    row = (
        await conn.execute(
            select(hold_extensions).where(hold_extensions.c.request_id == request_id)
        )
    ).one_or_none()
    if row is None:
        return None
    hold = await get_hold(conn, row.hold_id)
    assert hold is not None
    return ExtendOutcome(
        # The hold as this answer left it, whatever happened to it since.
        extension_answer(hold, row.amount_after_micros, row.expires_at_after),
        row.required_micros,
        None if row.denial_reason is None else DenialReason(row.denial_reason),
        row.decision_available_micros,
        budget_store.usages_from_json(row.budgets),
        row.request_fingerprint,
    )


async def prior_admin_request(conn: AsyncConnection, request_id: str) -> TenantOutcome | None:
    row = (
        await conn.execute(select(admin_requests).where(admin_requests.c.request_id == request_id))
    ).one_or_none()
    if row is None:
        return None
    return TenantOutcome(account_from_json(row.result), row.request_fingerprint)


async def prior_grant(conn: AsyncConnection, request_id: str) -> GrantOutcome | None:
    entry = await entry_by_request(conn, request_id)
    if entry is None:
        return None
    return GrantOutcome(entry.entry_id, balance_after(entry), entry.request_fingerprint or "")
