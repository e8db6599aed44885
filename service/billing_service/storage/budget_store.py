"""Budgets in SQL: their settings, their use per period, and the statements the ledger runs
inside its own transactions so that a budget moves in the same transaction as the tenant.

Lock order: a transaction that moves both locks the tenant's row first, then its budget
periods (user before API key), so two transactions never wait on each other in a cycle.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    bindparam,
    delete,
    exists,
    insert,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billing_service.domain.budgets import (
    Budget,
    BudgetPeriod,
    BudgetScope,
    BudgetUsage,
    in_scope_order,
    period_start,
)
from billing_service.storage.database import storage_faults_unavailable, transaction
from billing_service.storage.tables import budget_periods, budget_requests, budgets, tenants

# Holds record the budgets that applied as JSON.


def usages_to_json(usages: tuple[BudgetUsage, ...]) -> str | None:
    if not usages:
        return None
    return json.dumps([_usage_to_dict(usage) for usage in usages], sort_keys=True)


def usages_from_json(text: str | None) -> tuple[BudgetUsage, ...]:
    if not text:
        return ()
    return tuple(_usage_from_dict(body) for body in json.loads(text))


def _usage_to_dict(usage: BudgetUsage) -> dict[str, Any]:
    budget = usage.budget
    return {
        "tenant_id": budget.tenant_id,
        "scope": budget.scope.value,
        "scope_id": budget.scope_id,
        "limit_micros": budget.limit_micros,
        "period": budget.period.value,
        "period_start": usage.period_start.isoformat(),
        "spent_micros": usage.spent_micros,
        "held_micros": usage.held_micros,
    }


def _usage_from_dict(body: dict[str, Any]) -> BudgetUsage:
    budget = Budget(
        body["tenant_id"],
        BudgetScope(body["scope"]),
        body["scope_id"],
        body["limit_micros"],
        BudgetPeriod(body["period"]),
    )
    return BudgetUsage(
        budget,
        datetime.fromisoformat(body["period_start"]),
        body["spent_micros"],
        body["held_micros"],
    )


# Statements run inside the ledger's transactions, built once with bound parameters: building
# a Core statement per call (coercions, cache key) cost more CPU than running it on SQLite.


def applicable_sql(*, user: bool, api_key: bool) -> ColumnElement[bool]:
    """Which budgets apply to a call: the tenant's (bound as :tenant) budget of its user
    (:user) and of its API key (:api_key), for the scopes the call names."""
    scopes = []
    if user:
        scopes.append(
            and_(budgets.c.scope == BudgetScope.USER.value, budgets.c.scope_id == bindparam("user"))
        )
    if api_key:
        scopes.append(
            and_(
                budgets.c.scope == BudgetScope.API_KEY.value,
                budgets.c.scope_id == bindparam("api_key"),
            )
        )
    return and_(budgets.c.tenant_id == bindparam("tenant"), or_(*scopes))


def any_applicable_sql(*, user: bool, api_key: bool) -> ColumnElement[bool]:
    """Whether any budget applies (applicable_sql), as a column another statement returns."""
    return exists().where(applicable_sql(user=user, api_key=api_key))


def _applicable(user: bool, api_key: bool) -> Select[Any]:
    return select(budgets).where(applicable_sql(user=user, api_key=api_key))


_APPLICABLE = {
    (True, False): _applicable(user=True, api_key=False),
    (False, True): _applicable(user=False, api_key=True),
    (True, True): _applicable(user=True, api_key=True),
}

# A budget's row and a period's row, keyed by bound parameters (names that no SET clause uses).
_BUDGET_KEY = (
    budgets.c.tenant_id == bindparam("k_tenant"),
    budgets.c.scope == bindparam("k_scope"),
    budgets.c.scope_id == bindparam("k_scope_id"),
)
_PERIOD_KEY = (
    budget_periods.c.tenant_id == bindparam("k_tenant"),
    budget_periods.c.scope == bindparam("k_scope"),
    budget_periods.c.scope_id == bindparam("k_scope_id"),
    budget_periods.c.period_start == bindparam("k_start"),
)
_BUDGET_LIMIT = select(budgets.c.limit_micros).where(*_BUDGET_KEY)
_PERIOD_USE = select(budget_periods.c.spent_micros, budget_periods.c.held_micros).where(
    *_PERIOD_KEY
)
_LOCKED_PERIOD_USE = _PERIOD_USE.with_for_update()
# A period's row, created empty unless it exists (executed with the row's column values).
_CREATE_PERIOD = {
    "postgresql": postgresql.insert(budget_periods).on_conflict_do_nothing(),
    "sqlite": sqlite.insert(budget_periods).on_conflict_do_nothing(),
}
_MOVE_PERIOD = (
    update(budget_periods)
    .where(*_PERIOD_KEY)
    .values(
        spent_micros=budget_periods.c.spent_micros + bindparam("spent_delta"),
        held_micros=budget_periods.c.held_micros + bindparam("held_delta"),
    )
)


def scope_params(user_id: str, api_key_id: str) -> dict[str, str]:
    """The bound :user and :api_key of applicable_sql, for the scopes a call names."""
    params = {}
    if user_id:
        params["user"] = user_id
    if api_key_id:
        params["api_key"] = api_key_id
    return params


async def applicable_budgets(
    conn: AsyncConnection, tenant_id: str, user_id: str, api_key_id: str
) -> list[Budget]:
    """The budgets of this user and API key, user first."""
    if not (user_id or api_key_id):
        return []
    statement = _APPLICABLE[(bool(user_id), bool(api_key_id))]
    params = {"tenant": tenant_id, **scope_params(user_id, api_key_id)}
    rows = (await conn.execute(statement, params)).all()
    found = [_budget_from_row(row) for row in rows]
    return sorted(found, key=lambda budget: budget.scope is not BudgetScope.USER)


async def current_usage(
    conn: AsyncConnection, budget: Budget, now: datetime, *, lock: bool
) -> BudgetUsage:
    """The budget's use in the period of `now`. lock: create its row if missing and lock it
    until the transaction ends (the caller may then move it)."""
    start = period_start(budget.period, now)
    key = _period_params(budget, start)
    if lock:
        await conn.execute(
            _CREATE_PERIOD[conn.dialect.name],
            {
                "tenant_id": budget.tenant_id,
                "scope": budget.scope.value,
                "scope_id": budget.scope_id,
                "period_start": start,
                "spent_micros": 0,
                "held_micros": 0,
            },
        )
    row = (await conn.execute(_LOCKED_PERIOD_USE if lock else _PERIOD_USE, key)).one_or_none()
    if row is None:
        return BudgetUsage(budget, start)
    return BudgetUsage(budget, start, row.spent_micros, row.held_micros)


async def locked_usages(
    conn: AsyncConnection, tenant_id: str, user_id: str, api_key_id: str, now: datetime
) -> tuple[BudgetUsage, ...]:
    found = await applicable_budgets(conn, tenant_id, user_id, api_key_id)
    return tuple([await current_usage(conn, budget, now, lock=True) for budget in found])


async def relock(conn: AsyncConnection, usages: tuple[BudgetUsage, ...]) -> tuple[int, ...]:
    """Locks the periods a hold took from; returns each one's remaining now (by its limit
    at the decision)."""
    remaining = []
    for usage in usages:
        key = _period_params(usage.budget, usage.period_start)
        row = (await conn.execute(_LOCKED_PERIOD_USE, key)).one()
        remaining.append(usage.budget.limit_micros - row.spent_micros - row.held_micros)
    return tuple(remaining)


async def locked_hold_usages(
    conn: AsyncConnection, usages: tuple[BudgetUsage, ...]
) -> tuple[BudgetUsage, ...]:
    """The budgets a hold took from, as they apply to its extension: each one's limit now (a
    budget deleted since no longer applies) and its use in the period the hold took from, that
    period's row locked until the transaction ends (user before API key)."""
    found = []
    for usage in in_scope_order(usages):
        budget = usage.budget
        key = _period_params(budget, usage.period_start)
        row = (await conn.execute(_BUDGET_LIMIT, key)).one_or_none()
        period = (await conn.execute(_LOCKED_PERIOD_USE, key)).one()
        if row is None:
            continue
        found.append(
            BudgetUsage(
                replace(budget, limit_micros=row.limit_micros),
                usage.period_start,
                period.spent_micros,
                period.held_micros,
            )
        )
    return tuple(found)


async def move_periods(
    conn: AsyncConnection,
    usages: tuple[BudgetUsage, ...],
    *,
    spent_delta: int = 0,
    held_delta: int = 0,
) -> None:
    """Moves the periods a hold took from, exactly like the tenant's balance and held."""
    for usage in usages:
        params = {
            **_period_params(usage.budget, usage.period_start),
            "spent_delta": spent_delta,
            "held_delta": held_delta,
        }
        await conn.execute(_MOVE_PERIOD, params)


def _period_params(budget: Budget, start: datetime) -> dict[str, Any]:
    """The bound key of _PERIOD_KEY (and, without k_start, of _BUDGET_KEY)."""
    return {
        "k_tenant": budget.tenant_id,
        "k_scope": budget.scope.value,
        "k_scope_id": budget.scope_id,
        "k_start": start,
    }


def _budget_from_row(row: Any) -> Budget:
    return Budget(
        row.tenant_id,
        BudgetScope(row.scope),
        row.scope_id,
        row.limit_micros,
        BudgetPeriod(row.period),
    )


class BudgetStore:
    """BudgetService's storage: each method is one transaction."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @storage_faults_unavailable
    async def tenant_exists(self, tenant_id: str) -> bool:
        async with self._engine.connect() as conn:
            found = await conn.execute(
                select(tenants.c.tenant_id).where(tenants.c.tenant_id == tenant_id)
            )
            return found.one_or_none() is not None

    @storage_faults_unavailable
    async def set_budget(
        self, budget: Budget, request_id: str, request_fingerprint: str, now: datetime
    ) -> tuple[BudgetUsage, str] | None:
        """Stores `budget`; returns its use and the fingerprint of the request that answered
        (a retry gets the first answer). None: the tenant does not exist."""
        try:
            async with transaction(self._engine) as conn:
                if not await _tenant_exists(conn, budget.tenant_id):
                    return None
                changes = {"limit_micros": budget.limit_micros, "period": budget.period.value}
                updated = await conn.execute(
                    update(budgets).where(*_budget_where(budget)).values(**changes, updated_at=now)
                )
                if updated.rowcount == 0:
                    await conn.execute(
                        insert(budgets).values(
                            tenant_id=budget.tenant_id,
                            scope=budget.scope.value,
                            scope_id=budget.scope_id,
                            created_at=now,
                            updated_at=now,
                            **changes,
                        )
                    )
                usage = await current_usage(conn, budget, now, lock=False)
                await _record_request(conn, request_id, request_fingerprint, usage, now)
                return usage, request_fingerprint
        except IntegrityError:
            prior = await self._prior_request(request_id)
            if prior is None:
                raise
            return prior

    @storage_faults_unavailable
    async def delete_budget(
        self,
        tenant_id: str,
        scope: BudgetScope,
        scope_id: str,
        request_id: str,
        request_fingerprint: str,
        now: datetime,
    ) -> tuple[BudgetUsage, str] | None:
        """Removes a budget; returns it as it was. None: no such budget."""
        try:
            async with transaction(self._engine) as conn:
                row = (
                    await conn.execute(
                        delete(budgets)
                        .where(
                            budgets.c.tenant_id == tenant_id,
                            budgets.c.scope == scope.value,
                            budgets.c.scope_id == scope_id,
                        )
                        .returning(*budgets.c)
                    )
                ).one_or_none()
                if row is None:
                    prior = await _prior(conn, request_id)
                    return prior
                usage = await current_usage(conn, _budget_from_row(row), now, lock=False)
                await _record_request(conn, request_id, request_fingerprint, usage, now)
                return usage, request_fingerprint
        except IntegrityError:
            prior = await self._prior_request(request_id)
            if prior is None:
                raise
            return prior

    @storage_faults_unavailable
    async def get_budget(
        self, tenant_id: str, scope: BudgetScope, scope_id: str, now: datetime
    ) -> BudgetUsage | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(budgets).where(
                        budgets.c.tenant_id == tenant_id,
                        budgets.c.scope == scope.value,
                        budgets.c.scope_id == scope_id,
                    )
                )
            ).one_or_none()
            if row is None:
                return None
            return await current_usage(conn, _budget_from_row(row), now, lock=False)

    @storage_faults_unavailable
    async def list_budgets(
        self,
        tenant_id: str,
        scope: BudgetScope | None,
        after: tuple[str, str] | None,
        limit: int,
        now: datetime,
    ) -> list[BudgetUsage]:
        """A tenant's budgets by scope then scope id, after the key `after`, at most `limit`."""
        query = select(budgets).where(budgets.c.tenant_id == tenant_id)
        if scope is not None:
            query = query.where(budgets.c.scope == scope.value)
        if after is not None:
            query = query.where(tuple_(budgets.c.scope, budgets.c.scope_id) > after)
        query = query.order_by(budgets.c.scope, budgets.c.scope_id).limit(limit)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
            return [
                await current_usage(conn, _budget_from_row(row), now, lock=False) for row in rows
            ]

    @storage_faults_unavailable
    async def tenant_budgets(self, tenant_id: str, now: datetime) -> list[BudgetUsage]:
        """Every budget of a tenant with its use, by scope then scope id."""
        query = (
            select(budgets)
            .where(budgets.c.tenant_id == tenant_id)
            .order_by(budgets.c.scope, budgets.c.scope_id)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
            return [
                await current_usage(conn, _budget_from_row(row), now, lock=False) for row in rows
            ]

    async def _prior_request(self, request_id: str) -> tuple[BudgetUsage, str] | None:
        async with self._engine.connect() as conn:
            return await _prior(conn, request_id)


async def _tenant_exists(conn: AsyncConnection, tenant_id: str) -> bool:
    found = await conn.execute(select(tenants.c.tenant_id).where(tenants.c.tenant_id == tenant_id))
    return found.one_or_none() is not None


def _budget_where(budget: Budget) -> list[Any]:
    return [
        budgets.c.tenant_id == budget.tenant_id,
        budgets.c.scope == budget.scope.value,
        budgets.c.scope_id == budget.scope_id,
    ]


async def _record_request(
    conn: AsyncConnection,
    request_id: str,
    request_fingerprint: str,
    usage: BudgetUsage,
    now: datetime,
) -> None:
    await conn.execute(
        insert(budget_requests).values(
            request_id=request_id,
            request_fingerprint=request_fingerprint,
            result=usages_to_json((usage,)),
            created_at=now,
        )
    )


async def _prior(conn: AsyncConnection, request_id: str) -> tuple[BudgetUsage, str] | None:
    row = (
        await conn.execute(
            select(budget_requests).where(budget_requests.c.request_id == request_id)
        )
    ).one_or_none()
    if row is None:
        return None
    return usages_from_json(row.result)[0], row.request_fingerprint
