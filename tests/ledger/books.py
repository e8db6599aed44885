"""Checks of the books read straight from the tables, beside `audit_ledger`.

`ledger_problems` restates every invariant of storage/tables.py in plain SQL reads and Python, so
a bug in the audit's own query cannot hide a bug in the ledger.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_service.storage.audit import audit_ledger
from billing_service.storage.budget_store import usages_from_json
from billing_service.storage.tables import (
    admin_requests,
    budget_periods,
    holds,
    ledger_entries,
    tenants,
    usage_records,
)

_SETTLING_KIND = {"committed": "debit", "released": "release", "expired": "expiry"}


@dataclass(frozen=True)
class Tables:
    """Every row of the ledger's tables, read in one transaction."""

    tenants: list[Any]
    entries: list[Any]
    holds: list[Any]
    usage: dict[str, Any]
    budget_periods: list[Any] = field(default_factory=list)


async def read_tables(engine: AsyncEngine) -> Tables:
    async with engine.connect() as conn:
        tenant_rows = list(await conn.execute(select(tenants).order_by(tenants.c.tenant_id)))
        entry_rows = list(
            await conn.execute(select(ledger_entries).order_by(ledger_entries.c.entry_id))
        )
        hold_rows = list(await conn.execute(select(holds)))
        usage_rows = {row.hold_id: row for row in await conn.execute(select(usage_records))}
        period_rows = list(await conn.execute(select(budget_periods)))
    return Tables(tenant_rows, entry_rows, hold_rows, usage_rows, period_rows)


async def ledger_problems(engine: AsyncEngine, *, cap: bool = True) -> list[str]:
    """Every broken invariant, read from the tables directly (empty when the books balance).

    cap=False skips `available >= 0`, which an operator breaks legitimately by lowering a limit.
    """
    return table_problems(await read_tables(engine), cap=cap)


def table_problems(tables: Tables, *, cap: bool = True) -> list[str]:
    tenant_rows, entry_rows, hold_rows = tables.tenants, tables.entries, tables.holds
    usage_rows = tables.usage
    problems: list[str] = []

    entries_by_tenant: dict[str, list[Any]] = defaultdict(list)
    entries_by_hold: dict[str, list[Any]] = defaultdict(list)
    for entry in entry_rows:
        entries_by_tenant[entry.tenant_id].append(entry)
        if entry.hold_id is not None:
            entries_by_hold[entry.hold_id].append(entry)
        kind, balance, held = entry.kind, entry.balance_delta_micros, entry.held_delta_micros
        ok = {
            "grant": balance > 0 and held == 0,
            "hold": balance == 0 and held > 0,
            "extension": balance == 0 and held > 0,
            "release": balance == 0 and held <= 0,
            "expiry": balance == 0 and held < 0,
            "debit": balance <= 0 and held < 0,
            "refund": balance > 0 and held == 0,
        }.get(kind, False)
        if not ok:
            problems.append(f"entry {entry.entry_id}: {kind} with deltas ({balance}, {held})")
        if entry.available_after_micros - entry.balance_after_micros + entry.held_after_micros < 0:
            problems.append(f"entry {entry.entry_id}: negative effective limit after it")

    open_held: dict[str, int] = defaultdict(int)
    for hold in hold_rows:
        if hold.status == "open" and hold.billing == "metered":
            open_held[hold.tenant_id] += hold.amount_micros

    for tenant in tenant_rows:
        who = f"tenant {tenant.tenant_id}"
        balance = held = 0
        for entry in entries_by_tenant[tenant.tenant_id]:
            balance += entry.balance_delta_micros
            held += entry.held_delta_micros
            if (entry.balance_after_micros, entry.held_after_micros) != (balance, held):
                problems.append(
                    f"{who}: entry {entry.entry_id} says after=({entry.balance_after_micros}, "
                    f"{entry.held_after_micros}), the running sums are ({balance}, {held})"
                )
            if held < 0:
                problems.append(f"{who}: held below zero after entry {entry.entry_id}")
        if (tenant.balance_micros, tenant.held_micros) != (balance, held):
            problems.append(
                f"{who}: row says ({tenant.balance_micros}, {tenant.held_micros}), "
                f"entries sum to ({balance}, {held})"
            )
        if tenant.held_micros != open_held[tenant.tenant_id]:
            problems.append(
                f"{who}: held {tenant.held_micros} != open holds {open_held[tenant.tenant_id]}"
            )
        limit = tenant.credit_limit_micros if tenant.payment_method_on_file else 0
        if cap and tenant.balance_micros + limit - tenant.held_micros < 0:
            problems.append(f"{who}: over its credit limit")
        if cap and tenant.balance_micros < -limit:
            problems.append(f"{who}: balance {tenant.balance_micros} below -{limit}")

    for hold in hold_rows:
        problems.extend(_hold_problems(hold, entries_by_hold[hold.hold_id], usage_rows))
    for hold_id in set(usage_rows) - {h.hold_id for h in hold_rows if h.status == "committed"}:
        problems.append(f"usage record {hold_id} without a committed hold")
    problems.extend(budget_problems(tables))
    return problems


def budget_problems(tables: Tables) -> list[str]:
    """Each budget period's spent is the charges less refunds of the usage records of the holds
    that took from it, and its held the amounts of those still open."""
    spent: dict[tuple[Any, ...], int] = defaultdict(int)
    held: dict[tuple[Any, ...], int] = defaultdict(int)
    for hold in tables.holds:
        if hold.status == "denied" or hold.billing != "metered":
            continue
        for usage in usages_from_json(hold.budgets):
            budget = usage.budget
            key = (budget.tenant_id, budget.scope.value, budget.scope_id, usage.period_start)
            if hold.status == "open":
                held[key] += hold.amount_micros
            record = tables.usage.get(hold.hold_id)
            if record is not None:
                spent[key] += record.charged_micros - hold.refunded_micros
    problems = []
    stored = {
        (row.tenant_id, row.scope, row.scope_id, row.period_start): (
            row.spent_micros,
            row.held_micros,
        )
        for row in tables.budget_periods
    }
    for key in set(spent) | set(held) | set(stored):
        expected = (spent.get(key, 0), held.get(key, 0))
        if stored.get(key, (0, 0)) != expected:
            problems.append(f"budget period {key}: stored {stored.get(key)}, holds say {expected}")
    return problems


def _hold_problems(hold: Any, entries: list[Any], usage_rows: dict[str, Any]) -> list[str]:
    who = f"hold {hold.hold_id} ({hold.status})"
    problems: list[str] = []
    kinds = [entry.kind for entry in entries]
    metered = hold.billing == "metered"
    if hold.status == "denied":
        if entries or hold.hold_id in usage_rows:
            problems.append(f"{who}: a denied reservation has entries or usage")
        if hold.denial_reason is None:
            problems.append(f"{who}: no denial reason")
        return problems
    if hold.denial_reason is not None:
        problems.append(f"{who}: a granted hold with a denial reason")
    if metered:
        expected = ["hold"]
        if hold.status in _SETTLING_KIND:
            expected.append(_SETTLING_KIND[hold.status])
        settling = [kind for kind in kinds if kind not in ("refund", "extension")]
        if settling != expected:
            problems.append(f"{who}: entries {kinds}, expected {expected} then refunds")
        settled_by = _SETTLING_KIND.get(hold.status)
        if settled_by in kinds and "extension" in kinds[kinds.index(settled_by) :]:
            problems.append(f"{who}: extended after it settled: {kinds}")
        held = sum(entry.held_delta_micros for entry in entries)
        if held != (hold.amount_micros if hold.status == "open" else 0):
            problems.append(f"{who}: its entries hold {held}")
        if entries and entries[0].held_delta_micros != hold.amount_micros - hold.extended_micros:
            problems.append(f"{who}: hold entry of {entries[0].held_delta_micros}")
        extended = sum(e.held_delta_micros for e in entries if e.kind == "extension")
        if extended != hold.extended_micros:
            problems.append(
                f"{who}: extension entries of {extended}, column {hold.extended_micros}"
            )
        if hold.amount_micros < 1:
            problems.append(f"{who}: a metered hold of {hold.amount_micros}")
    else:
        if (
            hold.amount_micros != 0
            or hold.extended_micros != 0
            or any(kind not in ("release",) for kind in kinds)
        ):
            problems.append(f"{who}: an included hold with amount or entries {kinds}")
        if any(entry.held_delta_micros or entry.balance_delta_micros for entry in entries):
            problems.append(f"{who}: an included hold moved money")
    usage = usage_rows.get(hold.hold_id)
    if hold.status == "committed":
        if usage is None:
            return [*problems, f"{who}: no usage record"]
        if usage.charged_micros + usage.uncollected_micros != (usage.cost_micros if metered else 0):
            problems.append(f"{who}: charged + uncollected != cost")
        if min(usage.charged_micros, usage.uncollected_micros, usage.cost_micros) < 0:
            problems.append(f"{who}: a negative amount on its usage record")
        if usage.payment_source != ("credit" if metered else "included"):
            problems.append(f"{who}: paid from {usage.payment_source}")
        if usage.held_micros != hold.amount_micros:
            problems.append(f"{who}: usage says held {usage.held_micros}")
        debits = sum(e.balance_delta_micros for e in entries if e.kind == "debit")
        if debits != -usage.charged_micros:
            problems.append(f"{who}: debited {-debits}, charged {usage.charged_micros}")
        refunds = sum(e.balance_delta_micros for e in entries if e.kind == "refund")
        if refunds != hold.refunded_micros or refunds > usage.charged_micros:
            problems.append(
                f"{who}: refunded {refunds} (column {hold.refunded_micros}) of "
                f"{usage.charged_micros}"
            )
    elif usage is not None or hold.refunded_micros or "refund" in kinds:
        problems.append(f"{who}: usage or refunds without a commit")
    if hold.status == "open" and hold.settled_at is not None:
        problems.append(f"{who}: open but settled")
    if hold.status != "open" and hold.settled_at is None:
        problems.append(f"{who}: settled without a time")
    return problems


async def assert_books_balance(engine: AsyncEngine, *, cap: bool = True) -> None:
    """audit_ledger is clean and the tables agree with it."""
    assert await audit_ledger(engine, check_exposure=cap) == []
    assert await ledger_problems(engine, cap=cap) == []


@dataclass(frozen=True)
class Snapshot:
    """Everything a retry must leave unchanged."""

    tenants: tuple[tuple[Any, ...], ...]
    holds: tuple[tuple[Any, ...], ...]
    counts: tuple[int, ...]


async def snapshot(engine: AsyncEngine) -> Snapshot:
    async with engine.connect() as conn:
        tenant_rows = await conn.execute(select(tenants).order_by(tenants.c.tenant_id))
        hold_rows = await conn.execute(
            select(holds.c.hold_id, holds.c.status, holds.c.refunded_micros).order_by(
                holds.c.hold_id
            )
        )
        counts = []
        for table in (tenants, holds, ledger_entries, usage_records, admin_requests):
            counts.append(
                (await conn.execute(select(func.count()).select_from(table))).scalar_one()
            )
        return Snapshot(
            tuple(tuple(row) for row in tenant_rows),
            tuple(tuple(row) for row in hold_rows),
            tuple(counts),
        )


async def money(engine: AsyncEngine, tenant_id: str) -> tuple[int, int]:
    """(balance, held) of a tenant, from its row."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(tenants.c.balance_micros, tenants.c.held_micros).where(
                    tenants.c.tenant_id == tenant_id
                )
            )
        ).one()
    return int(row.balance_micros), int(row.held_micros)


async def entry_kinds(engine: AsyncEngine, tenant_id: str) -> list[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(ledger_entries.c.kind)
            .where(ledger_entries.c.tenant_id == tenant_id)
            .order_by(ledger_entries.c.entry_id)
        )
        return [str(kind) for (kind,) in rows]
