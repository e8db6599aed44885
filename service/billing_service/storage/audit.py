"""The books audit: every tenant's counters checked against its ledger entries and open holds.

One definition, run in three places: the tests after every step of the property-based state
machine and at the end of every concurrency test, the benchmark after every load run, and the
service itself in the background (billing_service.books_audit), which exports what it finds as
metrics. An audit with no findings means the books balance.

It only reads, in one snapshot, on a connection of its own: on PostgreSQL a REPEATABLE READ
read-only transaction, on SQLite a deferred transaction (WAL gives it a snapshot at its first
read), so it takes no lock a ReserveCredit or a Commit waits on, keeps no pooled connection from
them, and money moving while it reads never shows as a mismatch.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billing_service.domain.model import HoldStatus
from billing_service.domain.pricing import ModelBilling
from billing_service.storage.budget_store import usages_from_json
from billing_service.storage.credit_sql import available_credit_sql
from billing_service.storage.database import SQLITE_SNAPSHOT, audit_engine, is_postgres
from billing_service.storage.tables import (
    budget_periods,
    holds,
    ledger_entries,
    tenants,
    usage_records,
)


class FindingKind(enum.StrEnum):
    BALANCE = "balance"  # the tenant's balance is not the sum of its entries' balance deltas
    HELD = "held"  # its held amount is not the sum of its entries' held deltas
    OPEN_HOLDS = "open_holds"  # its held amount is not the sum of its open metered holds
    BUDGET_PERIOD = "budget_period"  # a budget period's spent or held is not what its holds say
    # Exposure above the credit limit: only an operator lowering a limit under open holds or a
    # debt causes it, so it is reported apart from the books disagreeing.
    OVER_CREDIT_LIMIT = "over_credit_limit"


@dataclass(frozen=True)
class Finding:
    tenant_id: str
    kind: FindingKind
    message: str  # one line, numbers and ids only


@dataclass(frozen=True)
class BooksAudit:
    tenants_audited: int
    findings: tuple[Finding, ...]

    @property
    def tenants_disagreeing(self) -> frozenset[str]:
        """Tenants whose books do not balance."""
        return frozenset(
            finding.tenant_id
            for finding in self.findings
            if finding.kind is not FindingKind.OVER_CREDIT_LIMIT
        )

    @property
    def tenants_over_credit_limit(self) -> frozenset[str]:
        return frozenset(
            finding.tenant_id
            for finding in self.findings
            if finding.kind is FindingKind.OVER_CREDIT_LIMIT
        )

    def problems(self, *, check_exposure: bool = True) -> list[str]:
        return [
            finding.message
            for finding in self.findings
            if check_exposure or finding.kind is not FindingKind.OVER_CREDIT_LIMIT
        ]


async def audit_books(engine: AsyncEngine) -> BooksAudit:
    """Audits every tenant in one read-only snapshot of the database."""
    # A connection of its own: the scan grows with the ledger, and must not keep one of the
    # pool's (SQLite's only one) from the calls and the readiness check.
    own = audit_engine(engine)
    if is_postgres(own):
        snapshot = own.execution_options(
            isolation_level="REPEATABLE READ", postgresql_readonly=True
        )
    else:
        snapshot = own.execution_options(**{SQLITE_SNAPSHOT: True})
    try:
        async with snapshot.connect() as conn, conn.begin():
            audited, findings = await _tenant_findings(conn)
            findings.extend(await _budget_period_findings(conn))
    finally:
        await own.dispose()
    return BooksAudit(audited, tuple(findings))


async def audit_ledger(engine: AsyncEngine, *, check_exposure: bool = True) -> list[str]:
    """One line per finding of `audit_books` (empty when every tenant's books balance).

    check_exposure: also report tenants whose exposure is above their credit limit; pass False
    where a test lowers a limit under open holds on purpose.
    """
    return (await audit_books(engine)).problems(check_exposure=check_exposure)


async def _tenant_findings(conn: AsyncConnection) -> tuple[int, list[Finding]]:
    entry_sums = (
        select(
            ledger_entries.c.tenant_id,
            func.coalesce(func.sum(ledger_entries.c.balance_delta_micros), 0).label("balance"),
            func.coalesce(func.sum(ledger_entries.c.held_delta_micros), 0).label("held"),
        )
        .group_by(ledger_entries.c.tenant_id)
        .subquery()
    )
    open_holds = (
        select(
            holds.c.tenant_id,
            func.coalesce(func.sum(holds.c.amount_micros), 0).label("held"),
        )
        .where(holds.c.status == HoldStatus.OPEN, holds.c.billing == ModelBilling.METERED)
        .group_by(holds.c.tenant_id)
        .subquery()
    )
    query = (
        select(
            tenants.c.tenant_id,
            tenants.c.balance_micros,
            tenants.c.held_micros,
            available_credit_sql().label("available"),
            func.coalesce(entry_sums.c.balance, 0).label("entries_balance"),
            func.coalesce(entry_sums.c.held, 0).label("entries_held"),
            func.coalesce(open_holds.c.held, 0).label("open_held"),
        )
        .select_from(
            tenants.outerjoin(entry_sums, entry_sums.c.tenant_id == tenants.c.tenant_id).outerjoin(
                open_holds, open_holds.c.tenant_id == tenants.c.tenant_id
            )
        )
        .order_by(tenants.c.tenant_id)
    )
    audited = 0
    findings: list[Finding] = []
    for row in await conn.execute(query):
        audited += 1
        tenant_id = row.tenant_id
        who = f"tenant {tenant_id}"
        if row.balance_micros != row.entries_balance:
            message = f"{who}: balance {row.balance_micros} != sum of entries {row.entries_balance}"
            findings.append(Finding(tenant_id, FindingKind.BALANCE, message))
        if row.held_micros != row.entries_held:
            message = f"{who}: held {row.held_micros} != sum of entries {row.entries_held}"
            findings.append(Finding(tenant_id, FindingKind.HELD, message))
        if row.held_micros != row.open_held:
            message = f"{who}: held {row.held_micros} != open holds {row.open_held}"
            findings.append(Finding(tenant_id, FindingKind.OPEN_HOLDS, message))
        if row.available < 0:
            message = f"{who}: exposure over the credit limit by {-row.available} micros"
            findings.append(Finding(tenant_id, FindingKind.OVER_CREDIT_LIMIT, message))
    return audited, findings


_PeriodKey = tuple[str, str, str, datetime]


async def _budget_period_findings(conn: AsyncConnection) -> list[Finding]:
    """Each budget period's spent is what the holds that took from it charged, less their
    refunds; its held is the amount of those still open."""
    spent: dict[_PeriodKey, int] = defaultdict(int)
    held: dict[_PeriodKey, int] = defaultdict(int)
    took_from_budgets = (
        select(
            holds.c.status,
            holds.c.amount_micros,
            holds.c.refunded_micros,
            holds.c.budgets,
            usage_records.c.charged_micros,
        )
        .select_from(holds.outerjoin(usage_records, usage_records.c.hold_id == holds.c.hold_id))
        .where(
            holds.c.status != HoldStatus.DENIED,
            holds.c.billing == ModelBilling.METERED,
            and_(holds.c.budgets.is_not(None), holds.c.budgets.not_in(["", "[]"])),
        )
    )
    async for hold in await conn.stream(took_from_budgets):
        for usage in usages_from_json(hold.budgets):
            budget = usage.budget
            key = (budget.tenant_id, budget.scope.value, budget.scope_id, usage.period_start)
            if hold.status == HoldStatus.OPEN:
                held[key] += hold.amount_micros
            if hold.charged_micros is not None:
                spent[key] += hold.charged_micros - hold.refunded_micros
    stored: dict[_PeriodKey, tuple[int, int]] = {
        (row.tenant_id, row.scope, row.scope_id, row.period_start): (
            row.spent_micros,
            row.held_micros,
        )
        for row in await conn.execute(select(budget_periods))
    }
    findings = []
    for key in sorted(set(spent) | set(held) | set(stored)):
        expected = (spent.get(key, 0), held.get(key, 0))
        if stored.get(key, (0, 0)) != expected:
            tenant_id, scope, scope_id, period_start = key
            message = (
                f"tenant {tenant_id}: budget {scope} {scope_id!r} period from "
                f"{period_start.isoformat()} stores (spent, held) {stored.get(key, (0, 0))}, "
                f"its holds say {expected}"
            )
            findings.append(Finding(tenant_id, FindingKind.BUDGET_PERIOD, message))
    return findings
