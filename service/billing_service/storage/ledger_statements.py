"""The statements the ledger's transactions share, built once, and the short calls that run
them: read or lock an account or a hold, take a hold under the exposure cap, move a tenant's
balance and held amounts, append a ledger entry.

take_hold is the conditional UPDATE that applies the admission rule of domain/admission.py,
compiled into its WHERE by credit_sql.py."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Row, bindparam, insert, literal, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from billing_service.domain.ledger import EntryKind
from billing_service.domain.model import Account, Hold, HoldStatus
from billing_service.storage import budget_store
from billing_service.storage.credit_sql import tenant_admits_sql
from billing_service.storage.hold_sql import due_hold_sql, live_hold_sql
from billing_service.storage.ledger_rows import ACCOUNT_COLUMNS, account_from_row, hold_from_row
from billing_service.storage.tables import holds, ledger_entries, tenants, usage_records

# Statements of the general transaction that every call runs, built once: building a Core
# statement per call (coercions, cache key) cost more CPU than executing it on SQLite.
# The exposure cap (see take_hold), without what it returns.
_TAKE_HOLD_IF_ADMITTED = (
    update(tenants)
    .where(tenants.c.tenant_id == bindparam("tenant"), tenant_admits_sql(bindparam("amount")))
    .values(held_micros=tenants.c.held_micros + bindparam("amount"))
)
_TAKE_HOLD = _TAKE_HOLD_IF_ADMITTED.returning(*ACCOUNT_COLUMNS)


def _take_hold_seeing_budgets(*, user: bool, api_key: bool) -> Any:
    """_TAKE_HOLD that also returns whether any budget applies to the call (as `budgeted`),
    read in the same statement: a call that no budget applies to reads no budget."""
    budgeted = budget_store.any_applicable_sql(user=user, api_key=api_key)
    return _TAKE_HOLD_IF_ADMITTED.returning(*ACCOUNT_COLUMNS, budgeted.label("budgeted"))


_TAKE_HOLD_SEEING_BUDGETS = {
    (user, api_key): _take_hold_seeing_budgets(user=user, api_key=api_key)
    for user, api_key in ((True, False), (False, True), (True, True))
}
_MOVE = (
    update(tenants)
    .where(tenants.c.tenant_id == bindparam("tenant"))
    .values(
        balance_micros=tenants.c.balance_micros + bindparam("balance_delta"),
        held_micros=tenants.c.held_micros + bindparam("held_delta"),
    )
    .returning(*ACCOUNT_COLUMNS)
)
CLAIM_FOR_COMMIT = (
    update(holds)
    .where(holds.c.hold_id == bindparam("hold"), live_hold_sql(bindparam("at")))
    .values(status=HoldStatus.COMMITTED, settled_at=bindparam("at"))
    .returning(*holds.c)
)
RELEASE_HOLD = (
    update(holds)
    .where(holds.c.hold_id == bindparam("hold"))
    .values(status=HoldStatus.RELEASED, settled_at=bindparam("at"))
)
EXPIRE_HOLD = (
    update(holds)
    .where(
        holds.c.hold_id == bindparam("hold"),
        due_hold_sql(bindparam("at", type_=holds.c.expires_at.type)),
    )
    .values(status=HoldStatus.EXPIRED, settled_at=bindparam("at"))
    .returning(holds.c.tenant_id, holds.c.amount_micros, holds.c.billing, holds.c.budgets)
)
_ACCOUNT = select(*ACCOUNT_COLUMNS).where(tenants.c.tenant_id == bindparam("tenant"))
LOCKED_ACCOUNT = _ACCOUNT.with_for_update()
_HOLD = select(holds).where(holds.c.hold_id == bindparam("hold"))
_LOCKED_HOLD = _HOLD.with_for_update()
_HOLD_BY_REQUEST = select(holds).where(holds.c.request_id == bindparam("request"))
USAGE_RECORD_BY_REQUEST = select(usage_records).where(
    usage_records.c.request_id == bindparam("request")
)
_ENTRY_BY_REQUEST = select(ledger_entries).where(
    ledger_entries.c.request_id == bindparam("request")
)
INSERT_HOLD = insert(holds)
INSERT_USAGE_RECORD = insert(usage_records)
_APPEND_ENTRY = insert(ledger_entries).returning(ledger_entries.c.entry_id)


async def get_account(
    conn: AsyncConnection, tenant_id: str, *, lock: bool = False
) -> Account | None:
    query = LOCKED_ACCOUNT if lock else _ACCOUNT
    row = (await conn.execute(query, {"tenant": tenant_id})).one_or_none()
    return None if row is None else account_from_row(row)


async def get_hold(conn: AsyncConnection, hold_id: str) -> Hold | None:
    row = (await conn.execute(_HOLD, {"hold": hold_id})).one_or_none()
    return None if row is None else hold_from_row(row)


async def locked_hold(conn: AsyncConnection, hold_id: str) -> Hold | None:
    """The hold, its row locked until the transaction ends: a commit, release or sweep of it
    waits, then finds it as this transaction leaves it."""
    found = (await conn.execute(_LOCKED_HOLD, {"hold": hold_id})).one_or_none()
    return None if found is None else hold_from_row(found)


async def move(
    conn: AsyncConnection, tenant_id: str, balance_delta: int, held_delta: int
) -> Account | None:
    params = {"tenant": tenant_id, "balance_delta": balance_delta, "held_delta": held_delta}
    row = (await conn.execute(_MOVE, params)).one_or_none()
    return None if row is None else account_from_row(row)


async def append_entry(
    conn: AsyncConnection,
    account_after: Account,
    kind: EntryKind,
    now: datetime,
    *,
    hold_id: str | None = None,
    balance_delta: int = 0,
    held_delta: int = 0,
    request_id: str | None = None,
    request_fingerprint: str | None = None,
    memo: str | None = None,
    charge_id: str | None = None,
) -> int:
    entry = {
        "tenant_id": account_after.tenant_id,
        "kind": kind,
        "hold_id": hold_id,
        "request_id": request_id,
        "request_fingerprint": request_fingerprint,
        "balance_delta_micros": balance_delta,
        "held_delta_micros": held_delta,
        "balance_after_micros": account_after.balance_micros,
        "held_after_micros": account_after.held_micros,
        "available_after_micros": account_after.available_micros,
        "memo": memo,
        "created_at": now,
        "charge_id": charge_id,
    }
    entry_id = (await conn.execute(_APPEND_ENTRY, entry)).scalar_one()
    return int(entry_id)


async def take_hold(conn: AsyncConnection, tenant_id: str, amount_micros: int) -> Account | None:
    """The exposure cap: moves `amount_micros` into held only if it fits in available credit."""
    params = {"tenant": tenant_id, "amount": amount_micros}
    row = (await conn.execute(_TAKE_HOLD, params)).one_or_none()
    return None if row is None else account_from_row(row)


async def take_hold_for(conn: AsyncConnection, hold: Hold) -> tuple[Account, bool] | None:
    """take_hold for a reservation; with the account after it, whether any budget applies."""
    if not (hold.user_id or hold.api_key_id):
        account = await take_hold(conn, hold.tenant_id, hold.amount_micros)
        return None if account is None else (account, False)
    statement = _TAKE_HOLD_SEEING_BUDGETS[(bool(hold.user_id), bool(hold.api_key_id))]
    params = {
        "tenant": hold.tenant_id,
        "amount": hold.amount_micros,
        **budget_store.scope_params(hold.user_id, hold.api_key_id),
    }
    row = (await conn.execute(statement, params)).one_or_none()
    return None if row is None else (account_from_row(row), bool(row.budgeted))


async def hold_by_request(conn: AsyncConnection, request_id: str) -> Hold | None:
    row = (await conn.execute(_HOLD_BY_REQUEST, {"request": request_id})).one_or_none()
    return None if row is None else hold_from_row(row)


async def entry_by_request(conn: AsyncConnection, request_id: str) -> Row[Any] | None:
    return (await conn.execute(_ENTRY_BY_REQUEST, {"request": request_id})).one_or_none()


async def due_holds(conn: AsyncConnection, now: datetime, limit: int) -> list[str]:
    due = await conn.execute(
        select(holds.c.hold_id)
        .where(due_hold_sql(literal(now, holds.c.expires_at.type)))
        .order_by(holds.c.expires_at)
        .limit(limit)
    )
    return list(due.scalars())
