"""The credit and admission rules of the domain (domain.model, domain.budgets,
domain.admission) compiled into the SQL of every statement that applies them.

Nothing here decides anything: each function renders a rule the domain defines, for a table,
alias or text statement. tests/ledger/test_admission_agrees.py checks that every path that
takes a hold decides as the domain does.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam
from sqlalchemy.sql import ColumnElement

from billing_service.domain.admission import (
    BUDGET_REFUSAL,
    TENANT_REFUSAL,
    tenant_admits,
)
from billing_service.domain.budgets import BUDGET_FITS, BUDGETS, HOLD_AMOUNT, SCOPE_RANK
from billing_service.domain.model import AVAILABLE_CREDIT, TENANTS
from billing_service.storage.rule_sql import (
    from_tables,
    postgres_text,
    qualified,
    text_params,
    to_sql,
)
from billing_service.storage.tables import tenants

_ON_TENANTS = from_tables({TENANTS: tenants})


def available_credit_sql() -> ColumnElement[int]:
    """Account.available_micros as SQL on the tenants table: the fit rule of every hold."""
    return to_sql(AVAILABLE_CREDIT, _ON_TENANTS)


def tenant_admits_sql(amount: ColumnElement[Any] | None = None) -> ColumnElement[bool]:
    """The tenant's checks of a metered hold (status, standing, credit) on the tenants table;
    the amount is the bound parameter `amount` unless given."""
    amount = bindparam("amount") if amount is None else amount
    return to_sql(tenant_admits(metered=True), _ON_TENANTS, {HOLD_AMOUNT.name: amount})


# PostgreSQL text for the hand-written statements, with `:name` parameters.


def available_credit_postgres_text(table: str = "tenants") -> str:
    return postgres_text(AVAILABLE_CREDIT, qualified({TENANTS: table}))


def tenant_admits_postgres_text(table: str = "tenants", amount: str = ":amount_micros") -> str:
    return postgres_text(
        tenant_admits(metered=True),
        qualified({TENANTS: table}),
        text_params({HOLD_AMOUNT.name: amount}),
    )


def tenant_refusal_postgres_text(table: str = "tenants", amount: str = ":amount_micros") -> str:
    """The reason a metered hold is refused by the tenant's checks ('' when none refuses)."""
    return postgres_text(
        TENANT_REFUSAL[True], qualified({TENANTS: table}), text_params({HOLD_AMOUNT.name: amount})
    )


def budget_fits_postgres_text(
    table: str, amount: str = ":amount_micros", overrides: dict[str, str] | None = None
) -> str:
    """The fit in one budget period read as `table`; `overrides` gives SQL for some of its
    columns (limit_micros, spent_micros, held_micros) read from elsewhere."""
    return postgres_text(
        BUDGET_FITS, qualified({BUDGETS: table}, overrides), text_params({HOLD_AMOUNT.name: amount})
    )


def budget_refusal_postgres_text(table: str, amount: str = ":amount_micros") -> str:
    """The reason one budget period refuses a hold ('' when it fits)."""
    return postgres_text(
        BUDGET_REFUSAL, qualified({BUDGETS: table}), text_params({HOLD_AMOUNT.name: amount})
    )


def budget_rank_postgres_text(table: str) -> str:
    """The rank of a budget in the order its fit is checked and its row locked."""
    return postgres_text(SCOPE_RANK, qualified({BUDGETS: table}))
