"""The hold rules that the database itself applies, written once as SQL expressions."""

from __future__ import annotations

from sqlalchemy import and_, literal_column
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql import ColumnElement

from billing_service.domain.model import HoldStatus
from billing_service.storage.tables import holds


def live_hold_sql(now: ColumnElement[object]) -> ColumnElement[bool]:
    """domain.ledger.is_live as SQL: the hold is open and `now` is before its expire time.
    Only a live hold may be committed or released; the rest of the time it is settled or due
    to expire."""
    return and_(holds.c.status == HoldStatus.OPEN.value, holds.c.expires_at > now)


def due_hold_sql(now: ColumnElement[object]) -> ColumnElement[bool]:
    """An open hold whose expire time `now` has reached: the sweep's (and a late release's)."""
    return and_(holds.c.status == HoldStatus.OPEN.value, holds.c.expires_at <= now)


def live_hold_postgres_text(now_param: str) -> str:
    """live_hold_sql as PostgreSQL text with the time as the named parameter `:now_param`, for
    the hand-written one-statement calls (they update holds, so the columns are unqualified)."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    compiled = live_hold_sql(literal_column(f":{now_param}")).compile(
        dialect=dialect, compile_kwargs={"literal_binds": True}
    )
    return str(compiled).replace("holds.", "")
