"""Every path that takes a hold decides as the domain's admission rule does.

domain.admission defines the rule once (tenant status, billing standing, credit, budgets, and
the order their reasons are decided in); storage compiles it into each statement. On random
accounts, budgets and amounts, the domain's `first_refusal` on the stored rows must equal:
- the general transaction's outcome (grant, or the stored denial and its reason), both backends;
- the store's outcome as served (on PostgreSQL: the one-statement reservation, then the
  general transaction for what it does not grant);
- the one-statement reservation alone (PostgreSQL): it grants exactly when the domain does;
- the refusal rule compiled to SQL, read back from the database: as SQLAlchemy Core on both
  backends, and as the PostgreSQL text the statements embed.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, literal, select, text

from billing_service.domain.admission import (
    BUDGET_REFUSAL,
    NO_REFUSAL,
    TENANT_REFUSAL,
    first_refusal,
)
from billing_service.domain.budgets import (
    HOLD_AMOUNT,
    SCOPE_RANK,
    BudgetPeriod,
    BudgetScope,
    period_start,
)
from billing_service.domain.model import TENANTS, DenialReason, Hold, HoldStatus, TenantStatus
from billing_service.domain.payments import BillingStatus
from billing_service.domain.pricing import ModelBilling, ModelPrice
from billing_service.storage.credit_sql import (
    budget_rank_postgres_text,
    budget_refusal_postgres_text,
    tenant_refusal_postgres_text,
)
from billing_service.storage.ledger_store import LedgerStore
from billing_service.storage.postgres_hot_path import HotPath
from billing_service.storage.rule_sql import from_tables, to_sql
from billing_service.storage.tables import budget_periods, budgets, tenants
from tests.ledger import examples
from tests.support.postgres import PostgresServer

_tenants = itertools.count()
_databases = itertools.count()
PRICE = ModelPrice("m", ModelBilling.METERED, flat_micros_per_call=1)
NOW = datetime(2026, 3, 4, 5, 6, tzinfo=UTC)


@dataclass(frozen=True)
class Shape:
    """A tenant's row and its budgets, as one example draws them."""

    status: TenantStatus
    billing_status: BillingStatus
    payment_method_on_file: bool
    credit_limit_micros: int
    balance_micros: int
    held_micros: int
    # (scope, limit, spent, held) per budget of the call's user / API key.
    budgets: tuple[tuple[BudgetScope, int, int, int], ...]


_money = st.integers(0, 3_000_000)
shapes = st.builds(
    Shape,
    status=st.sampled_from(TenantStatus),
    billing_status=st.sampled_from(BillingStatus),
    payment_method_on_file=st.booleans(),
    credit_limit_micros=_money,
    balance_micros=st.integers(-1_000_000, 2_000_000),
    held_micros=_money,
    budgets=st.lists(
        st.tuples(st.sampled_from(BudgetScope), st.integers(1, 2_000_000), _money, _money),
        max_size=2,
        unique_by=lambda budget: budget[0],
    ).map(tuple),
)


class Runner(examples.Runner):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.general = LedgerStore(self.engine, one_statement=False)
        self.statement = HotPath(self.engine) if self.postgres else None


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def runner(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Runner]:
    if request.param == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        url = server.create_database(f"admission_{next(_databases)}")
    else:
        path: Path = tmp_path_factory.mktemp("admission") / "billing.db"
        url = f"sqlite+aiosqlite:///{path}"
    runner = Runner(url)
    yield runner
    runner.close()


async def _tenant(runner: Runner, shape: Shape) -> str:
    """A tenant of this shape, written directly (the books are not the subject here)."""
    tenant = f"adm-{next(_tenants)}"
    async with runner.engine.begin() as conn:
        await conn.execute(
            insert(tenants).values(
                tenant_id=tenant,
                status=shape.status,
                billing_status=shape.billing_status,
                payment_method_on_file=shape.payment_method_on_file,
                credit_limit_micros=shape.credit_limit_micros,
                balance_micros=shape.balance_micros,
                held_micros=shape.held_micros,
                created_at=NOW,
                updated_at=NOW,
            )
        )
        for scope, limit, spent, held in shape.budgets:
            scope_id = "alice" if scope is BudgetScope.USER else "key-1"
            key = {"tenant_id": tenant, "scope": scope.value, "scope_id": scope_id}
            await conn.execute(
                insert(budgets).values(
                    **key, limit_micros=limit, period="day", created_at=NOW, updated_at=NOW
                )
            )
            await conn.execute(
                insert(budget_periods).values(
                    **key,
                    period_start=period_start(BudgetPeriod.DAY, NOW),
                    spent_micros=spent,
                    held_micros=held,
                )
            )
    return tenant


def _hold(tenant: str, amount: int) -> Hold:
    return examples.metered_hold(tenant, amount, NOW, PRICE, api_key_id="key-1")


async def _expected(runner: Runner, tenant: str, amount: int) -> DenialReason | None:
    account = await runner.store.get_account(tenant)
    assert account is not None
    usages = await runner.store.budget_usages(tenant, "alice", "key-1", NOW)
    refusal = first_refusal(account, True, amount, usages)
    return None if refusal is None else refusal.reason


def _outcome(stored: Hold) -> DenialReason | None:
    if stored.status is HoldStatus.OPEN:
        return None
    assert stored.status is HoldStatus.DENIED
    return stored.denial_reason


async def _refusal_in_sql(runner: Runner, tenant: str, amount: int) -> set[str]:
    """The refusal rule as SQL, evaluated by the database: Core on both backends, and the
    PostgreSQL text on PostgreSQL. Returns each form's answer ('' = granted)."""
    params = {HOLD_AMOUNT.name: literal(amount)}
    on_tables = from_tables({TENANTS: tenants})
    answers = set()
    async with runner.engine.connect() as conn:
        tenant_reason = (
            await conn.execute(
                select(to_sql(TENANT_REFUSAL[True], on_tables, params)).where(
                    tenants.c.tenant_id == tenant
                )
            )
        ).scalar_one()
        budget_reasons = (
            await conn.execute(
                select(to_sql(BUDGET_REFUSAL, _budget_columns, params))
                .select_from(_budget_rows)
                .where(budgets.c.tenant_id == tenant)
                .order_by(to_sql(SCOPE_RANK, _budget_columns))
            )
        ).scalars()
        answers.add(_first_reason([tenant_reason, *budget_reasons]))
        if runner.postgres:
            row = (
                await conn.execute(
                    text(
                        f"SELECT {tenant_refusal_postgres_text()} AS tenant_reason, "
                        f"(SELECT array_agg({budget_refusal_postgres_text('b')} "
                        f"ORDER BY {budget_rank_postgres_text('b')}) FROM ({_BUDGETS_SQL}) AS b)"
                        " AS budget_reasons FROM tenants WHERE tenant_id = :tenant_id"
                    ),
                    {"amount_micros": amount, "tenant_id": tenant},
                )
            ).one()
            answers.add(_first_reason([row.tenant_reason, *(row.budget_reasons or [])]))
    return answers


_budget_rows = budgets.join(
    budget_periods,
    (budget_periods.c.tenant_id == budgets.c.tenant_id)
    & (budget_periods.c.scope == budgets.c.scope)
    & (budget_periods.c.scope_id == budgets.c.scope_id),
)


def _budget_columns(column: object) -> object:
    name = column.name
    return budgets.c[name] if name in ("limit_micros", "scope") else budget_periods.c[name]


_BUDGETS_SQL = (
    "SELECT budgets.scope, budgets.limit_micros, p.spent_micros, p.held_micros "
    "FROM budgets JOIN budget_periods AS p ON p.tenant_id = budgets.tenant_id "
    "AND p.scope = budgets.scope AND p.scope_id = budgets.scope_id "
    "WHERE budgets.tenant_id = tenants.tenant_id"
)


def _first_reason(reasons: list[str]) -> str:
    return next((reason for reason in reasons if reason != NO_REFUSAL), NO_REFUSAL)


async def _agree(runner: Runner, shape: Shape, amount: int) -> None:
    tenant = await _tenant(runner, shape)
    expected = await _expected(runner, tenant, amount)
    assert await _refusal_in_sql(runner, tenant, amount) == {
        NO_REFUSAL if expected is None else expected.value
    }

    general = await runner.general.place_hold(_hold(tenant, amount), create_with_limit=None)
    assert _outcome(general) == expected, "general transaction"
    if expected is None:
        assert general.decision_available_micros == (
            shape.balance_micros
            + (shape.credit_limit_micros if shape.payment_method_on_file else 0)
            - shape.held_micros
            - amount
        )

    served = await runner.store.place_hold(
        _hold(await _tenant(runner, shape), amount), create_with_limit=None
    )
    assert _outcome(served) == expected, "the store as served"

    if runner.statement is not None:
        taken = await runner.statement.reserve(_hold(await _tenant(runner, shape), amount))
        assert (taken is not None) == (expected is None), "one-statement reservation"


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(shape=shapes, amount=st.integers(1, 3_000_000))
def test_every_path_decides_as_the_domain(runner: Runner, shape: Shape, amount: int) -> None:
    runner.loop.run_until_complete(_agree(runner, shape, amount))
