"""ReserveCredit, Commit and release on PostgreSQL in one statement each: one round trip, no
BEGIN/COMMIT.

Each statement is a chain of data-modifying CTEs run in autocommit mode. The tenant's row is
locked only while the statement runs, so concurrent calls for one tenant queue for
microseconds, not for a whole transaction's round trips. They are sent through asyncpg's own
prepared statements on a connection of the engine's pool: SQLAlchemy's execution machinery
(execution context, result rows) cost as much CPU per call as the rest of the call's storage
work (docs/performance.md).

The reserve takes the hold from the tenant and from every budget that applies (domain.budgets)
in the same statement; the commit and the release cover holds that took from no budget (one
that did is settled by the general transaction, which moves its budgets with the tenant), and so
does the extension (ExtendHold): it grows a live metered hold when the tenant admits the extra
amount and the request_id is new. When one returns no row (no room, unknown tenant, hold not
open, a retry, ...), the caller falls back to the general multi-statement transaction in
ledger_store, which decides and explains the outcome.
A unique-key violation (a retried request_id) aborts the whole statement, so nothing is
half-written; it is raised as SQLAlchemy's IntegrityError, and a lost connection as its
OperationalError, so that callers handle both paths' errors alike.

Rules they apply, and where those rules are defined and tested to agree:
- the fit rule `available >= amount`: storage.credit_sql (rendered into the text below);
- only a live hold (open, before its expire time) is committed or released:
  domain.ledger.is_live, rendered by storage.hold_sql (a release of a hold past its expire time
  falls back: the general transaction expires it);
- only a live hold grows (domain.ledger.check_extendable, the same `_LIVE`; one past its expire
  time falls back: the general transaction expires it);
- the cost of a call: domain.pricing.ModelPrice.cost_micros (the SQL `COST` below);
- what an extension adds: domain.pricing.ModelPrice.output_micros (the SQL `_EXTENSION` below),
  admitted by the tenant's checks of a reservation (domain.admission, via storage.credit_sql);
- what a commit charges: domain.ledger.settle (the SQL `charged_micros` below);
- the usage rollup of a commit: storage.rollups.add_to_rollup (the `rollup` CTE below).
tests/ledger/test_hot_path_agrees.py checks them against the domain on random inputs.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, NamedTuple, TypeVar, cast

import asyncpg
from sqlalchemy import BigInteger, DateTime, String, bindparam, text
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.sql.elements import BindParameter, TextClause
from sqlalchemy.types import TypeEngine
from sqlalchemy.util import greenlet_spawn

from billing_service.domain.budgets import EPOCH, BudgetPeriod, period_start
from billing_service.domain.commands import Commit, ExtendHold
from billing_service.domain.ledger import EntryKind
from billing_service.domain.model import Hold
from billing_service.domain.pricing import TOKENS_PER_PRICE_UNIT, ModelBilling
from billing_service.storage.budget_store import usages_from_json
from billing_service.storage.coalescer import Coalescer
from billing_service.storage.credit_sql import (
    available_credit_postgres_text,
    budget_fits_postgres_text,
    budget_rank_postgres_text,
    tenant_admits_postgres_text,
)
from billing_service.storage.database import retires_connection
from billing_service.storage.hold_sql import live_hold_postgres_text
from billing_service.storage.postgres_batch import (
    MAX_BATCH,
    BatchFunction,
    batch_function,
    hold_locks,
    install_sql,
)

T = TypeVar("T")

_AVAILABLE = available_credit_postgres_text()
_LIVE = live_hold_postgres_text("now")
_TENANT_ADMITS = tenant_admits_postgres_text()
_FITS_SEEN = budget_fits_postgres_text("seen")
# A period row not written yet: nothing spent or held.
_FITS_EMPTY = budget_fits_postgres_text("seen", overrides={"spent_micros": "0", "held_micros": "0"})
# The period row as locked by the upsert, with the hold's amount and the budget's limit.
_FITS_LOCKED = budget_fits_postgres_text(
    "p",
    "EXCLUDED.held_micros",
    overrides={
        "limit_micros": "(SELECT budgets.limit_micros FROM budgets"
        " WHERE budgets.tenant_id = p.tenant_id AND budgets.scope = p.scope"
        " AND budgets.scope_id = p.scope_id)"
    },
)
_RANK_SEEN = budget_rank_postgres_text("seen")

_RESERVE_SQL = f"""
WITH applying AS (
    SELECT budgets.scope, budgets.scope_id, budgets.limit_micros, budgets.period,
        CASE budgets.period WHEN 'day' THEN :day_start WHEN 'week' THEN :week_start
            WHEN 'month' THEN :month_start ELSE :epoch END AS period_start
    FROM budgets
    WHERE budgets.tenant_id = :tenant_id
        AND ((budgets.scope = 'user' AND budgets.scope_id = :user_id)
            OR (budgets.scope = 'api_key' AND budgets.scope_id = :api_key_id))
), seen AS (
    SELECT applying.*, COALESCE(p.spent_micros, 0) AS spent_micros,
        COALESCE(p.held_micros, 0) AS held_micros
    FROM applying LEFT JOIN budget_periods AS p ON p.tenant_id = :tenant_id
        AND p.scope = applying.scope AND p.scope_id = applying.scope_id
        AND p.period_start = applying.period_start
), account AS (
    UPDATE tenants
    SET held_micros = held_micros + :amount_micros
    WHERE tenant_id = :tenant_id AND ({_TENANT_ADMITS})
        AND NOT EXISTS (SELECT 1 FROM seen WHERE NOT ({_FITS_SEEN}))
    RETURNING tenant_id, balance_micros, held_micros, {_AVAILABLE} AS available_micros
), taken AS (
    INSERT INTO budget_periods AS p (
        tenant_id, scope, scope_id, period_start, spent_micros, held_micros
    )
    SELECT account.tenant_id, seen.scope, seen.scope_id, seen.period_start, 0, :amount_micros
    FROM account, seen
    WHERE {_FITS_EMPTY}
    -- The user's row before the API key's, like the general transaction: no lock cycle.
    ORDER BY {_RANK_SEEN}
    ON CONFLICT (tenant_id, scope, scope_id, period_start) DO UPDATE
    SET held_micros = p.held_micros + EXCLUDED.held_micros
    WHERE {_FITS_LOCKED}
    RETURNING p.scope, p.scope_id, p.period_start, p.spent_micros, p.held_micros
), taken_json AS (
    SELECT json_agg(json_build_object(
            'tenant_id', :tenant_id, 'scope', seen.scope, 'scope_id', seen.scope_id,
            'limit_micros', seen.limit_micros, 'period', seen.period,
            'period_start', seen.period_start, 'spent_micros', taken.spent_micros,
            'held_micros', taken.held_micros)
            ORDER BY {_RANK_SEEN})::text AS budgets,
        count(*) AS taken_count
    FROM taken JOIN seen ON seen.scope = taken.scope AND seen.scope_id = taken.scope_id
), hold AS (
    INSERT INTO holds (
        hold_id, request_id, request_fingerprint, tenant_id, user_id, model, billing,
        input_micros_per_mtok, cached_input_micros_per_mtok, output_micros_per_mtok,
        flat_micros_per_call, amount_micros, status, decision_available_micros,
        refunded_micros, created_at, expires_at, api_key_id, budgets
    )
    -- A budget that the snapshot showed with room but that another call filled before its
    -- row was locked is not taken: 1 / 0 then aborts the whole statement (nothing is kept),
    -- and the caller decides in the general transaction.
    SELECT :hold_id, :request_id, :request_fingerprint, account.tenant_id, :user_id, :model,
        'metered', :input_price, :cached_input_price, :output_price, :flat_price,
        :amount_micros, 'open', account.available_micros,
        0 / (taken_json.taken_count = (SELECT count(*) FROM seen))::int,
        :now, :expires_at, :api_key_id, taken_json.budgets
    FROM account, taken_json
    RETURNING hold_id, budgets
)
INSERT INTO ledger_entries (
    tenant_id, kind, hold_id, balance_delta_micros, held_delta_micros,
    balance_after_micros, held_after_micros, available_after_micros, created_at
)
SELECT account.tenant_id, 'hold', hold.hold_id, 0, :amount_micros,
    account.balance_micros, account.held_micros, account.available_micros, :now
FROM account, hold
RETURNING available_after_micros, (SELECT hold.budgets FROM hold) AS budgets
"""

# flat + ceil(sum(tokens x price per million) / 1e6), in bigint: prices <= 1e10 and tokens
# <= 1e8 keep the sum below 2^63 (domain.pricing bounds both).
_COST = """flat_micros_per_call + (
        :input_tokens * input_micros_per_mtok
        + :cached_input_tokens * cached_input_micros_per_mtok
        + :output_tokens * output_micros_per_mtok
        + 999999) / 1000000"""

_COMMIT_SQL = f"""
WITH claimed AS (
    UPDATE holds
    SET status = 'committed', settled_at = :now
    WHERE hold_id = :hold_id AND {_LIVE} AND budgets IS NULL
    RETURNING hold_id, tenant_id, user_id, model, billing, amount_micros, created_at,
        {_COST} AS cost_micros
), locked AS (
    SELECT tenants.tenant_id, {_AVAILABLE} AS available_micros
    FROM tenants JOIN claimed ON tenants.tenant_id = claimed.tenant_id
    WHERE claimed.billing = 'metered'
    FOR UPDATE OF tenants
), settled AS (
    SELECT claimed.*,
        CASE WHEN claimed.billing = 'metered'
            THEN LEAST(
                claimed.cost_micros,
                claimed.amount_micros + GREATEST(0, locked.available_micros))
            ELSE 0 END AS charged_micros
    FROM claimed LEFT JOIN locked ON locked.tenant_id = claimed.tenant_id
), moved AS (
    UPDATE tenants
    SET balance_micros = tenants.balance_micros - settled.charged_micros,
        held_micros = tenants.held_micros - settled.amount_micros
    FROM settled
    WHERE tenants.tenant_id = settled.tenant_id AND settled.billing = 'metered'
    RETURNING tenants.tenant_id, tenants.balance_micros, tenants.held_micros,
        {_AVAILABLE} AS available_micros
), entry AS (
    INSERT INTO ledger_entries (
        tenant_id, kind, hold_id, balance_delta_micros, held_delta_micros,
        balance_after_micros, held_after_micros, available_after_micros, created_at
    )
    SELECT moved.tenant_id, 'debit', settled.hold_id, -settled.charged_micros,
        -settled.amount_micros, moved.balance_micros, moved.held_micros,
        moved.available_micros, :now
    FROM settled JOIN moved ON moved.tenant_id = settled.tenant_id
), unchanged AS (
    SELECT tenants.tenant_id, {_AVAILABLE} AS available_micros
    FROM tenants JOIN claimed ON tenants.tenant_id = claimed.tenant_id
    WHERE claimed.billing <> 'metered'
), rollup AS (
    INSERT INTO usage_rollups AS r (
        tenant_id, day, model, user_id, call_count, input_tokens, cached_input_tokens,
        output_tokens, cost_micros, charged_micros
    )
    SELECT settled.tenant_id, (:now AT TIME ZONE 'UTC')::date, settled.model, settled.user_id,
        1, :input_tokens, :cached_input_tokens, :output_tokens, settled.cost_micros,
        settled.charged_micros
    FROM settled
    ON CONFLICT (tenant_id, day, model, user_id) DO UPDATE SET
        call_count = r.call_count + 1,
        input_tokens = r.input_tokens + EXCLUDED.input_tokens,
        cached_input_tokens = r.cached_input_tokens + EXCLUDED.cached_input_tokens,
        output_tokens = r.output_tokens + EXCLUDED.output_tokens,
        cost_micros = r.cost_micros + EXCLUDED.cost_micros,
        charged_micros = r.charged_micros + EXCLUDED.charged_micros
)
INSERT INTO usage_records (
    hold_id, request_id, request_fingerprint, tenant_id, user_id, model, input_tokens,
    cached_input_tokens, output_tokens, cost_micros, charged_micros, uncollected_micros,
    held_micros, payment_source, reserved_at, committed_at, available_after_micros
)
SELECT settled.hold_id, :request_id, :request_fingerprint, settled.tenant_id,
    settled.user_id, settled.model, :input_tokens, :cached_input_tokens, :output_tokens,
    settled.cost_micros, settled.charged_micros,
    CASE WHEN settled.billing = 'metered'
        THEN settled.cost_micros - settled.charged_micros ELSE 0 END,
    settled.amount_micros,
    CASE WHEN settled.billing = 'metered' THEN 'credit' ELSE 'included' END,
    settled.created_at, :now, COALESCE(moved.available_micros, unchanged.available_micros)
FROM settled
LEFT JOIN moved ON moved.tenant_id = settled.tenant_id
LEFT JOIN unchanged ON unchanged.tenant_id = settled.tenant_id
RETURNING *
"""


_RELEASE_SQL = f"""
WITH released AS (
    UPDATE holds
    SET status = 'released', settled_at = :now
    WHERE hold_id = :hold_id AND {_LIVE} AND billing = 'metered' AND budgets IS NULL
    RETURNING hold_id, tenant_id, amount_micros
), moved AS (
    UPDATE tenants
    SET held_micros = tenants.held_micros - released.amount_micros
    FROM released
    WHERE tenants.tenant_id = released.tenant_id
    RETURNING tenants.tenant_id, tenants.balance_micros, tenants.held_micros,
        {_AVAILABLE} AS available_micros
)
INSERT INTO ledger_entries (
    tenant_id, kind, hold_id, request_id, request_fingerprint, balance_delta_micros,
    held_delta_micros, balance_after_micros, held_after_micros, available_after_micros, memo,
    created_at
)
SELECT moved.tenant_id, 'release', released.hold_id, :request_id, :request_fingerprint, 0,
    -released.amount_micros, moved.balance_micros, moved.held_micros, moved.available_micros,
    :memo, :now
FROM released JOIN moved ON moved.tenant_id = released.tenant_id
RETURNING -held_delta_micros AS released_micros, available_after_micros
"""

# ceil(tokens x output price per million / 1e6), in bigint as `_COST`: what
# domain.pricing.ModelPrice.output_micros adds to a metered hold.
_EXTENSION = f"""(:additional_output_tokens * output_micros_per_mtok
        + {TOKENS_PER_PRICE_UNIT - 1}) / {TOKENS_PER_PRICE_UNIT}"""
_TENANT_ADMITS_EXTENSION = tenant_admits_postgres_text(amount="target.amount_micros")

# ExtendHold granted: the general transaction (extensions.extend_hold) writes the same rows.
# The hold is locked first, then its tenant: the order of that transaction and of a commit.
_EXTEND_SQL = f"""
WITH target AS (
    SELECT hold_id, tenant_id, {_EXTENSION} AS amount_micros
    FROM holds
    WHERE hold_id = :hold_id AND {_LIVE}
        AND billing = '{ModelBilling.METERED.value}' AND budgets IS NULL
        -- A retry (or a request_id used for another hold) is replayed by the general path.
        AND NOT EXISTS (
            SELECT 1 FROM hold_extensions WHERE hold_extensions.request_id = :request_id)
    FOR UPDATE
), account AS (
    UPDATE tenants
    SET held_micros = tenants.held_micros + target.amount_micros
    FROM target
    WHERE tenants.tenant_id = target.tenant_id AND ({_TENANT_ADMITS_EXTENSION})
    RETURNING tenants.tenant_id, tenants.balance_micros, tenants.held_micros,
        {_AVAILABLE} AS available_micros
), grown AS (
    UPDATE holds
    SET amount_micros = holds.amount_micros + target.amount_micros,
        extended_micros = holds.extended_micros + target.amount_micros,
        expires_at = GREATEST(holds.expires_at, :renewed_expires_at),
        granted_expires_at = COALESCE(holds.granted_expires_at, holds.expires_at)
    FROM target, account
    WHERE holds.hold_id = target.hold_id
    RETURNING holds.*
), entry AS (
    INSERT INTO ledger_entries (
        tenant_id, kind, hold_id, balance_delta_micros, held_delta_micros,
        balance_after_micros, held_after_micros, available_after_micros, created_at
    )
    SELECT account.tenant_id, '{EntryKind.EXTENSION.value}', target.hold_id, 0,
        target.amount_micros, account.balance_micros, account.held_micros,
        account.available_micros, :now
    FROM account, target
    WHERE target.amount_micros > 0
), answer AS (
    INSERT INTO hold_extensions (
        request_id, request_fingerprint, hold_id, tenant_id, required_micros, denial_reason,
        amount_after_micros, expires_at_after, decision_available_micros, budgets, created_at
    )
    SELECT :request_id, :request_fingerprint, grown.hold_id, grown.tenant_id,
        target.amount_micros, NULL, grown.amount_micros, grown.expires_at,
        account.available_micros, NULL, :now
    FROM grown, target, account
)
SELECT grown.*, target.amount_micros AS required_micros,
    account.available_micros AS available_after_micros
FROM grown, target, account
"""

_PARAM_NAMES = re.compile(r"(?<![:\w]):(\w+)")


def typed_statement(
    sql: str, *, text_params: tuple[str, ...], time_params: tuple[str, ...]
) -> TextClause:
    """A prepared-once statement whose parameters carry their SQL types (bigint by default)."""
    names = sorted(set(_PARAM_NAMES.findall(sql)))
    params: list[BindParameter[Any]] = []
    for name in names:
        sql_type: TypeEngine[Any] = BigInteger()
        if name in text_params:
            sql_type = String()
        elif name in time_params:
            sql_type = DateTime(timezone=True)
        params.append(bindparam(name, type_=sql_type))
    return text(sql).bindparams(*params)


RESERVE = typed_statement(
    _RESERVE_SQL,
    text_params=(
        "tenant_id",
        "hold_id",
        "request_id",
        "request_fingerprint",
        "user_id",
        "model",
        "api_key_id",
    ),
    time_params=("now", "expires_at", "day_start", "week_start", "month_start", "epoch"),
)
COMMIT = typed_statement(
    _COMMIT_SQL,
    text_params=("hold_id", "request_id", "request_fingerprint"),
    time_params=("now",),
)
RELEASE = typed_statement(
    _RELEASE_SQL,
    text_params=("hold_id", "request_id", "request_fingerprint", "memo"),
    time_params=("now",),
)

EXTEND = typed_statement(
    _EXTEND_SQL,
    text_params=("hold_id", "request_id", "request_fingerprint"),
    time_params=("now", "renewed_expires_at"),
)


_ASYNCPG_DIALECT = asyncpg_dialect.dialect()  # type: ignore[no-untyped-call]


class DriverStatement(NamedTuple):
    """A statement as asyncpg takes it: `$n::type` placeholders and the names in `$n` order.

    Rendered by SQLAlchemy's asyncpg dialect, so the text is the one SQLAlchemy would send
    (pg_stat_statements and bench/pgbench see one statement either way)."""

    sql: str
    names: tuple[str, ...]

    @classmethod
    def of(cls, statement: TextClause) -> DriverStatement:
        compiled = statement.compile(dialect=_ASYNCPG_DIALECT)
        return cls(compiled.string, tuple(compiled.positiontup or ()))

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        return [params[name] for name in self.names]


_RESERVE = DriverStatement.of(RESERVE)
_COMMIT = DriverStatement.of(COMMIT)
_RELEASE = DriverStatement.of(RELEASE)
_EXTEND = DriverStatement.of(EXTEND)

RESERVE_BATCH = batch_function(
    "reserve",
    RESERVE,
    outputs=(("out_available_micros", "bigint"), ("out_budgets", "text")),
    tenant_of="p_tenant_id[ord]",
)
_TENANT_OF_HOLD = "SELECT holds.tenant_id FROM holds WHERE holds.hold_id = p_hold_id[ord]"
COMMIT_BATCH = batch_function(
    "commit",
    COMMIT,
    outputs=(("out_record", "usage_records"),),
    tenant_of=_TENANT_OF_HOLD,
    lock_first=hold_locks("hold_id"),
)
RELEASE_BATCH = batch_function(
    "release",
    RELEASE,
    outputs=(("out_released_micros", "bigint"), ("out_available_micros", "bigint")),
    tenant_of=_TENANT_OF_HOLD,
    lock_first=hold_locks("hold_id"),
)


def reserve_params(hold: Hold) -> dict[str, Any]:
    price = hold.price
    assert price is not None
    assert hold.metered
    return {
        "amount_micros": hold.amount_micros,
        "tenant_id": hold.tenant_id,
        "hold_id": hold.hold_id,
        "request_id": hold.request_id,
        "request_fingerprint": hold.request_fingerprint,
        "user_id": hold.user_id,
        "api_key_id": hold.api_key_id,
        "model": hold.model,
        "input_price": price.input_micros_per_mtok,
        "cached_input_price": price.cached_input_micros_per_mtok,
        "output_price": price.output_micros_per_mtok,
        "flat_price": price.flat_micros_per_call,
        "now": hold.created_at,
        "expires_at": hold.expires_at,
        **{
            f"{period.value}_start": period_start(period, hold.created_at)
            for period in (BudgetPeriod.DAY, BudgetPeriod.WEEK, BudgetPeriod.MONTH)
        },
        "epoch": EPOCH,
    }


def commit_params(command: Commit, request_fingerprint: str, now: datetime) -> dict[str, Any]:
    usage = command.usage
    return {
        "hold_id": command.reservation_id,
        "request_id": command.request_id,
        "request_fingerprint": request_fingerprint,
        "input_tokens": usage.input_tokens,
        "cached_input_tokens": usage.cached_input_tokens,
        "output_tokens": usage.output_tokens,
        "now": now,
    }


def release_params(
    request_id: str, reservation_id: str, reason: str, request_fingerprint: str, now: datetime
) -> dict[str, Any]:
    return {
        "hold_id": reservation_id,
        "request_id": request_id,
        "request_fingerprint": request_fingerprint,
        "memo": reason or None,
        "now": now,
    }


class Released(NamedTuple):
    released_micros: int
    available_after_micros: int


class HotPath:
    """Runs the one-statement calls on connections of `engine`'s pool (PostgreSQL only).

    ReserveCredit, Commit and release calls that arrive while earlier ones of their kind are in
    flight are coalesced (storage.coalescer) and sent together as one call of their batch
    function (storage.postgres_batch); a lone call is sent as its own statement.
    """

    def __init__(
        self, engine: AsyncEngine, *, coalesce: bool = True, max_in_flight: int = 1
    ) -> None:
        """coalesce: False sends every call as its own statement at once."""
        self._engine = engine
        self._coalesce = coalesce
        self._installed: set[str] = set()
        self.reserves: Coalescer[Hold, Mapping[str, Any] | None] = Coalescer(
            self._reserve_one,
            self._reserve_many,
            max_in_flight=max_in_flight,
            max_batch=MAX_BATCH,
        )
        self.commits: Coalescer[Mapping[str, Any], Mapping[str, Any] | None] = Coalescer(
            self._commit_one,
            self._commit_many,
            max_in_flight=max_in_flight,
            max_batch=MAX_BATCH,
        )
        self.releases: Coalescer[Mapping[str, Any], Mapping[str, Any] | None] = Coalescer(
            self._release_one,
            self._release_many,
            max_in_flight=max_in_flight,
            max_batch=MAX_BATCH,
        )

    async def reserve(self, hold: Hold) -> Hold | None:
        """Takes a metered hold if it fits in the tenant's credit and in every budget that
        applies; returns the hold as stored, else None."""
        if self._coalesce:
            row = await self.reserves.submit(hold)
        else:
            row = await self._reserve_one(hold)
        if row is None:
            return None
        return replace(
            hold,
            decision_available_micros=int(row["available_after_micros"]),
            budgets=usages_from_json(row["budgets"]),
        )

    async def commit(
        self, command: Commit, request_fingerprint: str, now: datetime
    ) -> Mapping[str, Any] | None:
        """Settles an open, unexpired hold; returns the usage_records row written, else None."""
        params = commit_params(command, request_fingerprint, now)
        if self._coalesce:
            return await self.commits.submit(params)
        return await self._commit_one(params)

    async def release(
        self,
        request_id: str,
        reservation_id: str,
        reason: str,
        request_fingerprint: str,
        now: datetime,
    ) -> Released | None:
        """Releases a live metered hold that took from no budget, else returns None."""
        params = release_params(request_id, reservation_id, reason, request_fingerprint, now)
        if self._coalesce:
            row = await self.releases.submit(params)
        else:
            row = await self._release_one(params)
        if row is None:
            return None
        return Released(int(row["released_micros"]), int(row["available_after_micros"]))

    async def extend(
        self, command: ExtendHold, request_fingerprint: str, ttl: timedelta, now: datetime
    ) -> Mapping[str, Any] | None:
        """Grows a live metered hold that took from no budget by the price of the command's
        output tokens if the tenant admits that amount, for a request_id not seen before;
        returns the hold's row as grown, with `required_micros` and `available_after_micros`,
        else None."""
        return await self._fetchrow(
            _EXTEND,
            {
                "hold_id": command.reservation_id,
                "request_id": command.request_id,
                "request_fingerprint": request_fingerprint,
                "additional_output_tokens": command.additional_output_tokens,
                "renewed_expires_at": now + ttl,
                "now": now,
            },
        )

    # One call, one statement.

    async def _reserve_one(self, hold: Hold) -> Mapping[str, Any] | None:
        try:
            return await self._fetchrow(_RESERVE, reserve_params(hold))
        except asyncpg.DivisionByZeroError:
            return None  # a budget filled up under the statement: the general path decides

    async def _commit_one(self, params: Mapping[str, Any]) -> Mapping[str, Any] | None:
        return await self._fetchrow(_COMMIT, params)

    async def _release_one(self, params: Mapping[str, Any]) -> Mapping[str, Any] | None:
        return await self._fetchrow(_RELEASE, params)

    # Several calls, one round trip.

    async def _reserve_many(
        self, holds: Sequence[Hold]
    ) -> list[Mapping[str, Any] | BaseException | None]:
        rows = await self._call_batch(RESERVE_BATCH, [reserve_params(hold) for hold in holds])
        return [
            _item_result(
                row,
                lambda row: {
                    "available_after_micros": row["out_available_micros"],
                    "budgets": row["out_budgets"],
                },
            )
            for row in rows
        ]

    async def _commit_many(
        self, items: Sequence[Mapping[str, Any]]
    ) -> list[Mapping[str, Any] | BaseException | None]:
        rows = await self._call_batch(COMMIT_BATCH, items)
        return [_item_result(row, lambda row: row["out_record"]) for row in rows]

    async def _release_many(
        self, items: Sequence[Mapping[str, Any]]
    ) -> list[Mapping[str, Any] | BaseException | None]:
        rows = await self._call_batch(RELEASE_BATCH, items)
        return [
            _item_result(
                row,
                lambda row: {
                    "released_micros": row["out_released_micros"],
                    "available_after_micros": row["out_available_micros"],
                },
            )
            for row in rows
        ]

    async def _call_batch(
        self, function: BatchFunction, items: Sequence[Mapping[str, Any]]
    ) -> list[Mapping[str, Any]]:
        """One row per item, in the items' order."""

        async def call(driver: Any) -> list[Mapping[str, Any]]:
            if function.name not in self._installed:
                await self._install(driver, function)
            try:
                rows = await driver.fetch(function.call_sql, *function.call_args(items))
            except asyncpg.UndefinedFunctionError:
                # Dropped since (a database restored from a dump of another version): again.
                await self._install(driver, function)
                rows = await driver.fetch(function.call_sql, *function.call_args(items))
            return sorted(rows, key=lambda row: int(row["item"]))

        return await self._on_connection(function.call_sql, call)

    async def _install(self, driver: Any, function: BatchFunction) -> None:
        async with driver.transaction():
            for sql in install_sql(function):
                await driver.execute(sql)
        self._installed.add(function.name)

    async def _fetchrow(
        self, statement: DriverStatement, params: Mapping[str, Any]
    ) -> Mapping[str, Any] | None:
        async def fetchrow(driver: Any) -> Mapping[str, Any] | None:
            row = await driver.fetchrow(statement.sql, *statement.args(params))
            return cast("Mapping[str, Any] | None", row)

        return await self._on_connection(statement.sql, fetchrow)

    async def _on_connection(self, sql: str, work: Callable[[Any], Awaitable[T]]) -> T:
        """`work(driver)` on a pooled connection's asyncpg.Connection, its errors mapped as
        SQLAlchemy maps them: a unique key as IntegrityError, a fault or a transaction rolled
        back (deadlock, serialization failure) as OperationalError."""
        pooled = await self._engine.raw_connection()
        driver: Any = pooled.driver_connection  # an asyncpg.Connection
        try:
            return await work(driver)
        except asyncpg.IntegrityConstraintViolationError as error:
            raise IntegrityError(sql, None, error) from error
        except asyncpg.TransactionRollbackError as error:
            # A deadlock's victim or a serialization failure: PostgreSQL rolled the statement
            # (a batch: its whole transaction) back, so the caller retries it (UNAVAILABLE).
            raise OperationalError(sql, None, error) from error
        except BaseException as error:
            # Cancelled mid-statement (the caller's deadline), the connection may still be busy
            # with it: like a broken one, it is not handed to the next caller.
            cancelled = isinstance(error, asyncio.CancelledError)
            if not (cancelled or retires_connection(error) or driver.is_closed()):
                raise
            driver.terminate()
            await greenlet_spawn(self._invalidate, pooled, error, not cancelled)
            if cancelled or not isinstance(error, Exception):
                raise
            raise OperationalError(sql, None, error, connection_invalidated=True) from error
        finally:
            # Returning it to the pool awaits inside SQLAlchemy (a closing connection's close):
            # hence the greenlet.
            await greenlet_spawn(pooled.close)

    def _invalidate(self, pooled: PoolProxiedConnection, error: BaseException, fault: bool) -> None:
        """Drops `pooled`; after a fault, also marks the connections opened before it to be
        replaced at their next checkout: a database restart broke them all, and without
        pre-ping each would fail one more call. This is what SQLAlchemy's own execute does on a
        disconnect (Pool._invalidate; tests/ledger/test_postgres_hot_path.py checks it)."""
        if fault:
            self._engine.sync_engine.pool._invalidate(pooled, error, _checkin=False)
        pooled.invalidate(error)


def _item_result(
    row: Mapping[str, Any], done: Callable[[Mapping[str, Any]], Mapping[str, Any]]
) -> Mapping[str, Any] | BaseException | None:
    match row["item_outcome"]:
        case "done":
            return done(row)
        case "conflict":
            return IntegrityError("batch item", None, Exception("unique key of the item exists"))
        case _:
            return None
