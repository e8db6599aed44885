"""Tenants: their creation (explicit, or with default terms on a tenant's first call), changes of
their terms, the admin requests that record both, and grants of credit."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import insert, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from billing_service.domain.commands import CreateTenant, GrantCredit, UpdateTenant
from billing_service.domain.errors import ErrorReason, NotFound
from billing_service.domain.ledger import EntryKind
from billing_service.domain.model import Account, Balance, TenantStatus
from billing_service.domain.outcomes import GrantOutcome, TenantOutcome
from billing_service.storage.ledger_rows import (
    ACCOUNT_COLUMNS,
    account_from_row,
    account_row,
    account_to_json,
)
from billing_service.storage.ledger_statements import append_entry, move
from billing_service.storage.tables import admin_requests, tenants


async def create_default_tenant(
    conn: AsyncConnection, tenant_id: str, credit_limit_micros: int, now: datetime
) -> None:
    row = account_row(
        Account(
            tenant_id=tenant_id,
            status=TenantStatus.ACTIVE,
            credit_limit_micros=credit_limit_micros,
            payment_method_on_file=False,
            created_at=now,
            updated_at=now,
        )
    )
    # Two first calls of a new tenant may race to create it: the second creates nothing.
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    await conn.execute(dialect_insert(tenants).values(row).on_conflict_do_nothing())


async def record_admin_request(
    conn: AsyncConnection,
    request_id: str,
    request_fingerprint: str,
    operation: str,
    account: Account,
    now: datetime,
) -> None:
    await conn.execute(
        insert(admin_requests).values(
            request_id=request_id,
            request_fingerprint=request_fingerprint,
            operation=operation,
            tenant_id=account.tenant_id,
            result=account_to_json(account),
            created_at=now,
        )
    )


def tenant_not_found(tenant_id: str) -> NotFound:
    return NotFound(ErrorReason.TENANT_NOT_FOUND, f"tenant {tenant_id} does not exist")


async def grant_credit(
    conn: AsyncConnection, command: GrantCredit, request_fingerprint: str, now: datetime
) -> GrantOutcome:
    account = await move(conn, command.tenant_id, command.amount_micros, 0)
    if account is None:
        raise tenant_not_found(command.tenant_id)
    entry_id = await append_entry(
        conn,
        account,
        EntryKind.GRANT,
        now,
        balance_delta=command.amount_micros,
        request_id=command.request_id,
        request_fingerprint=request_fingerprint,
        memo=command.reason,
    )
    return GrantOutcome(entry_id, Balance.of(account), request_fingerprint)


async def create_tenant(
    conn: AsyncConnection,
    command: CreateTenant,
    request_fingerprint: str,
    credit_limit_micros: int,
    now: datetime,
) -> TenantOutcome:
    account = Account(
        tenant_id=command.tenant_id,
        status=command.status,
        credit_limit_micros=credit_limit_micros,
        payment_method_on_file=command.payment_method_on_file,
        created_at=now,
        updated_at=now,
    )
    await conn.execute(insert(tenants).values(account_row(account)))
    await record_admin_request(
        conn, command.request_id, request_fingerprint, "create_tenant", account, now
    )
    return TenantOutcome(account, request_fingerprint)


async def update_tenant(
    conn: AsyncConnection, command: UpdateTenant, request_fingerprint: str, now: datetime
) -> TenantOutcome:
    changes: dict[str, Any] = {"updated_at": now}
    if command.credit_limit_micros is not None:
        changes["credit_limit_micros"] = command.credit_limit_micros
    if command.status is not None:
        changes["status"] = command.status
    if command.payment_method_on_file is not None:
        changes["payment_method_on_file"] = command.payment_method_on_file
    row = (
        await conn.execute(
            update(tenants)
            .where(tenants.c.tenant_id == command.tenant_id)
            .values(changes)
            .returning(*ACCOUNT_COLUMNS)
        )
    ).one_or_none()
    if row is None:
        raise tenant_not_found(command.tenant_id)
    account = account_from_row(row)
    await record_admin_request(
        conn, command.request_id, request_fingerprint, "update_tenant", account, now
    )
    return TenantOutcome(account, request_fingerprint)
