"""The credit rules that the database itself applies, written once as SQL expressions."""

from __future__ import annotations

from sqlalchemy import case
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql import ColumnElement

from billing_service.storage.tables import tenants


def available_credit_sql() -> ColumnElement[int]:
    """Account.available_micros as SQL: the fit rule of every hold."""
    effective_limit = case(
        (tenants.c.payment_method_on_file, tenants.c.credit_limit_micros), else_=0
    )
    return tenants.c.balance_micros + effective_limit - tenants.c.held_micros


def available_credit_postgres_text() -> str:
    """The same expression as PostgreSQL text, for the hand-written hot-path statements."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    compiled = available_credit_sql().compile(
        dialect=dialect, compile_kwargs={"literal_binds": True}
    )
    return str(compiled)
