"""The ledger in SQL: each public method is one short transaction.

The exposure cap is enforced in one place, `_take_hold`: a single conditional UPDATE that
moves the tenant's held amount only if the hold fits in its available credit. It is atomic on
PostgreSQL (the row lock is taken by the UPDATE and the condition re-checked on the newest row
version) and on SQLite (transactions are serialized by BEGIN IMMEDIATE). No method decides
anything from a value it read earlier without holding the row's lock.

Idempotency keys are unique columns: holds.request_id (ReserveCredit), usage_records.request_id
(Commit), ledger_entries.request_id (Release, Refund, GrantCredit), admin_requests.request_id. A
retry hits the unique constraint, its transaction rolls back whole, and the stored result is
returned.

A hold settles once. Commit, release and expiry each change it only while it is open, under its
row lock (the conditional UPDATE of the commit and the sweep; SELECT ... FOR UPDATE of a release
or a refund), and re-read it once they hold the lock: whichever comes second finds it settled and
says so. What each request may do to a hold in each state is decided in domain.ledger.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, replace
from datetime import datetime, timedelta
from functools import partial
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Row, bindparam, func, insert, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billing_service.domain.budgets import DENIAL_REASONS, BudgetUsage, first_exhausted
from billing_service.domain.commands import (
    Commit,
    CreateTenant,
    ExtendHold,
    GrantCredit,
    Refund,
    Release,
    UpdateTenant,
)
from billing_service.domain.errors import AlreadyExists, ErrorReason, FailedPrecondition, NotFound
from billing_service.domain.ledger import (
    EntryKind,
    ReleaseAction,
    Settlement,
    check_committable,
    check_extendable,
    check_refundable,
    decide_release,
    hold_expired,
    refund_amount,
    settle,
)
from billing_service.domain.model import (
    Account,
    Balance,
    DenialReason,
    Hold,
    HoldStatus,
    PaymentSource,
    TenantStatus,
    UsageRecord,
)
from billing_service.domain.outcomes import (
    CommitOutcome,
    ExtendOutcome,
    GrantOutcome,
    RefundOutcome,
    ReleaseOutcome,
    TenantOutcome,
)
from billing_service.domain.payments import BillingStatus
from billing_service.domain.policy import decide, explain_refusal
from billing_service.domain.pricing import ModelBilling, ModelPrice, TokenUsage
from billing_service.storage import budget_store, postgres_hot_path
from billing_service.storage.credit_sql import tenant_admits_sql
from billing_service.storage.database import Transactions, storage_faults_unavailable
from billing_service.storage.hold_sql import due_hold_sql, live_hold_sql
from billing_service.storage.rollups import add_to_rollup
from billing_service.storage.tables import (
    admin_requests,
    hold_extensions,
    holds,
    ledger_entries,
    tenants,
    usage_records,
)

_ACCOUNT_COLUMNS = (
    tenants.c.tenant_id,
    tenants.c.status,
    tenants.c.credit_limit_micros,
    tenants.c.payment_method_on_file,
    tenants.c.balance_micros,
    tenants.c.held_micros,
    tenants.c.created_at,
    tenants.c.updated_at,
    tenants.c.billing_status,
)


# Statements of the general transaction that every call runs, built once: building a Core
# statement per call (coercions, cache key) cost more CPU than executing it on SQLite.
# The exposure cap (see _take_hold), without what it returns.
_TAKE_HOLD_IF_ADMITTED = (
    update(tenants)
    .where(tenants.c.tenant_id == bindparam("tenant"), tenant_admits_sql(bindparam("amount")))
    .values(held_micros=tenants.c.held_micros + bindparam("amount"))
)
_TAKE_HOLD = _TAKE_HOLD_IF_ADMITTED.returning(*_ACCOUNT_COLUMNS)


def _take_hold_seeing_budgets(*, user: bool, api_key: bool) -> Any:
    """_TAKE_HOLD that also returns whether any budget applies to the call (as `budgeted`),
    read in the same statement: a call that no budget applies to reads no budget."""
    budgeted = budget_store.any_applicable_sql(user=user, api_key=api_key)
    return _TAKE_HOLD_IF_ADMITTED.returning(*_ACCOUNT_COLUMNS, budgeted.label("budgeted"))


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
    .returning(*_ACCOUNT_COLUMNS)
)
_CLAIM_FOR_COMMIT = (
    update(holds)
    .where(holds.c.hold_id == bindparam("hold"), live_hold_sql(bindparam("at")))
    .values(status=HoldStatus.COMMITTED, settled_at=bindparam("at"))
    .returning(*holds.c)
)
_RELEASE_HOLD = (
    update(holds)
    .where(holds.c.hold_id == bindparam("hold"))
    .values(status=HoldStatus.RELEASED, settled_at=bindparam("at"))
)
_EXPIRE_HOLD = (
    update(holds)
    .where(
        holds.c.hold_id == bindparam("hold"),
        due_hold_sql(bindparam("at", type_=holds.c.expires_at.type)),
    )
    .values(status=HoldStatus.EXPIRED, settled_at=bindparam("at"))
    .returning(holds.c.tenant_id, holds.c.amount_micros, holds.c.billing, holds.c.budgets)
)
_ACCOUNT = select(*_ACCOUNT_COLUMNS).where(tenants.c.tenant_id == bindparam("tenant"))
_LOCKED_ACCOUNT = _ACCOUNT.with_for_update()
_HOLD = select(holds).where(holds.c.hold_id == bindparam("hold"))
_LOCKED_HOLD = _HOLD.with_for_update()
_HOLD_BY_REQUEST = select(holds).where(holds.c.request_id == bindparam("request"))
_USAGE_RECORD_BY_REQUEST = select(usage_records).where(
    usage_records.c.request_id == bindparam("request")
)
_ENTRY_BY_REQUEST = select(ledger_entries).where(
    ledger_entries.c.request_id == bindparam("request")
)
_INSERT_HOLD = insert(holds)
_INSERT_USAGE_RECORD = insert(usage_records)
_APPEND_ENTRY = insert(ledger_entries).returning(ledger_entries.c.entry_id)


class LedgerStore:
    """Tenants, holds, usage records and the append-only ledger, in one SQL database."""

    def __init__(
        self, engine: AsyncEngine, *, one_statement: bool = True, coalesce: bool = False
    ) -> None:
        """one_statement: on PostgreSQL, ReserveCredit, Commit, ExtendHold and release try their
        one statement first (postgres_hot_path); False sends every call through the general
        transaction (the tests compare the two). coalesce: those that arrive together go as
        one round trip (postgres_hot_path.HotPath)."""
        self._engine = engine
        self._db = Transactions(engine)
        # The one-statement hot path runs without BEGIN/COMMIT round trips.
        self._postgres = engine.dialect.name == "postgresql"
        self._hot_path = (
            postgres_hot_path.HotPath(engine, coalesce=coalesce)
            if self._postgres and one_statement
            else None
        )

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    # Reads

    @storage_faults_unavailable
    async def get_account(self, tenant_id: str) -> Account | None:
        return await self._db.read(lambda conn: _get_account(conn, tenant_id))

    @storage_faults_unavailable
    async def get_hold(self, hold_id: str) -> Hold | None:
        return await self._db.read(lambda conn: _get_hold(conn, hold_id))

    @storage_faults_unavailable
    async def budget_usages(
        self, tenant_id: str, user_id: str, api_key_id: str, now: datetime
    ) -> tuple[BudgetUsage, ...]:
        """The budgets of this user and API key with their use in the period of `now`."""

        async def read(conn: AsyncConnection) -> tuple[BudgetUsage, ...]:
            found = await budget_store.applicable_budgets(conn, tenant_id, user_id, api_key_id)
            return tuple(
                [await budget_store.current_usage(conn, b, now, lock=False) for b in found]
            )

        return await self._db.read(read)

    # ReserveCredit

    @storage_faults_unavailable
    async def place_hold(
        self,
        hold: Hold,
        *,
        create_with_limit: int | None,
        defer_credit_denial: bool = False,
        credit_denial_reason: DenialReason | None = None,
    ) -> Hold:
        """Takes `hold` if it fits; else stores it as denied, with the reason. One transaction.

        Returns the stored hold, or the earlier one with the same request_id (a retry).
        create_with_limit: when set, an unknown tenant is created with this credit limit;
        when None, an unknown tenant raises NotFound.
        defer_credit_denial: a refusal for lack of credit is returned without being stored
        (the caller waits for a top-up, then asks again and stores the final answer).
        credit_denial_reason: a refusal for lack of credit is stored with this reason instead
        (the top-up that could have made room was not allowed).
        """
        try:
            if self._hot_path is not None and hold.metered:
                taken = await self._hot_path.reserve(hold)
                if taken is not None:
                    return taken
            return await self._db.write(
                lambda conn: _place_hold(
                    conn, hold, create_with_limit, defer_credit_denial, credit_denial_reason
                )
            )
        except IntegrityError:
            return await self._prior_hold(hold.request_id)

    @storage_faults_unavailable
    async def find_hold(self, request_id: str) -> Hold | None:
        """The reservation made by a ReserveCredit with this request_id, if any."""
        return await self._db.read(lambda conn: _hold_by_request(conn, request_id))

    async def _prior_hold(self, request_id: str) -> Hold:
        prior = await self.find_hold(request_id)
        if prior is None:
            raise LookupError(f"no hold with request_id {request_id!r} after a conflict")
        return prior

    # Commit

    @storage_faults_unavailable
    async def commit(
        self, command: Commit, request_fingerprint: str, now: datetime
    ) -> CommitOutcome:
        try:
            if self._hot_path is not None:
                row = await self._hot_path.commit(command, request_fingerprint, now)
                if row is not None:
                    return CommitOutcome(_usage_from_row(row), row["available_after_micros"])
            return await self._db.write(
                lambda conn: _commit(conn, command, request_fingerprint, now)
            )
        except IntegrityError:
            prior = await self._db.read(lambda conn: _prior_commit(conn, command.request_id))
            if prior is None:
                raise
            return prior

    # ExtendHold

    @storage_faults_unavailable
    async def extend_hold(
        self, command: ExtendHold, request_fingerprint: str, ttl: timedelta, now: datetime
    ) -> ExtendOutcome:
        """Grows an open hold by the price of more output tokens if that amount fits, decided
        by the admission rule as a reservation of it would be; stores the answer either way.
        Raises HOLD_EXPIRED after expiring it if its expire time has passed, and the domain's
        error for a settled hold. A retry returns the stored answer."""
        try:
            if self._hot_path is not None:
                row = await self._hot_path.extend(command, request_fingerprint, ttl, now)
                if row is not None:
                    return _extension_granted(row, request_fingerprint)
            outcome = await self._db.write(
                lambda conn: _extend_hold(conn, command, request_fingerprint, ttl, now)
            )
        except IntegrityError:
            prior = await self._db.read(lambda conn: _prior_extension(conn, command.request_id))
            if prior is None:
                raise
            return prior
        if outcome is None:
            # Expired in the transaction above, now committed: the answer is that it expired.
            raise hold_expired(command.reservation_id)
        return outcome

    # Release and Refund

    @storage_faults_unavailable
    async def release(
        self, command: Release, request_fingerprint: str, now: datetime
    ) -> ReleaseOutcome:
        """Releases an open hold. Raises HOLD_EXPIRED after expiring it if its expire time has
        passed, and the domain's error for a settled hold (a committed one is never touched)."""
        outcome = await self._release(
            command.request_id, command.reservation_id, command.reason, request_fingerprint, now
        )
        # A stored answer of another kind is another request's: the fingerprints differ.
        return ReleaseOutcome(
            outcome.amount_micros, outcome.available_after_micros, outcome.request_fingerprint
        )

    @storage_faults_unavailable
    async def refund(
        self, command: Refund, request_fingerprint: str, now: datetime
    ) -> RefundOutcome:
        """Refunds part of a committed charge; a Refund without an amount is a release."""
        if command.asks_release:
            return await self._release(
                command.request_id,
                command.reservation_id,
                command.reason,
                request_fingerprint,
                now,
            )
        try:
            return await self._db.write(
                lambda conn: _refund(conn, command, request_fingerprint, now)
            )
        except IntegrityError:
            prior = await self._db.read(lambda conn: _prior_refund(conn, command.request_id))
            if prior is None:
                raise
            return prior

    async def _release(
        self,
        request_id: str,
        reservation_id: str,
        reason: str,
        request_fingerprint: str,
        now: datetime,
    ) -> RefundOutcome:
        try:
            if self._hot_path is not None:
                released = await self._hot_path.release(
                    request_id, reservation_id, reason, request_fingerprint, now
                )
                if released is not None:
                    return RefundOutcome(
                        EntryKind.RELEASE,
                        released.released_micros,
                        released.available_after_micros,
                        0,
                        request_fingerprint,
                    )
            outcome = await self._db.write(
                lambda conn: _release(
                    conn, request_id, reservation_id, reason, request_fingerprint, now
                )
            )
        except IntegrityError:
            prior = await self._db.read(lambda conn: _prior_refund(conn, request_id))
            if prior is None:
                raise
            return prior
        if outcome is None:
            # Expired in the transaction above, now committed: the answer is that it expired.
            raise hold_expired(reservation_id)
        return outcome

    # Expiry

    @storage_faults_unavailable
    async def release_expired(self, now: datetime, limit: int = 100) -> int:
        """Releases up to `limit` open holds whose expire time has passed; returns how many."""
        due_ids = await self._db.read(lambda conn: _due_holds(conn, now, limit))
        released = 0
        for hold_id in due_ids:
            # One transaction per hold: it locks one tenant row at a time, never two.
            released += await self._db.write(partial(_expire, hold_id=hold_id, now=now))
        return released

    # GrantCredit

    @storage_faults_unavailable
    async def grant(
        self, command: GrantCredit, request_fingerprint: str, now: datetime
    ) -> GrantOutcome:
        async def grant(conn: AsyncConnection) -> GrantOutcome:
            account = await _move(conn, command.tenant_id, command.amount_micros, 0)
            if account is None:
                raise _tenant_not_found(command.tenant_id)
            entry_id = await _append_entry(
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

        try:
            return await self._db.write(grant)
        except IntegrityError:
            entry = await self._db.read(lambda conn: _entry_by_request(conn, command.request_id))
            if entry is None:
                raise
            return GrantOutcome(
                entry.entry_id,
                _balance_after(entry),
                entry.request_fingerprint or "",
            )

    # Tenants

    @storage_faults_unavailable
    async def create_tenant(
        self,
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

        async def create(conn: AsyncConnection) -> TenantOutcome:
            await conn.execute(insert(tenants).values(_account_row(account)))
            await _record_admin_request(
                conn, command.request_id, request_fingerprint, "create_tenant", account, now
            )
            return TenantOutcome(account, request_fingerprint)

        try:
            return await self._db.write(create)
        except IntegrityError:
            prior = await self._prior_admin_request(command.request_id)
            if prior is not None:
                return prior
            raise AlreadyExists(
                ErrorReason.TENANT_ALREADY_EXISTS, f"tenant {command.tenant_id} already exists"
            ) from None

    @storage_faults_unavailable
    async def update_tenant(
        self, command: UpdateTenant, request_fingerprint: str, now: datetime
    ) -> TenantOutcome:
        changes: dict[str, Any] = {"updated_at": now}
        if command.credit_limit_micros is not None:
            changes["credit_limit_micros"] = command.credit_limit_micros
        if command.status is not None:
            changes["status"] = command.status
        if command.payment_method_on_file is not None:
            changes["payment_method_on_file"] = command.payment_method_on_file

        async def change(conn: AsyncConnection) -> TenantOutcome:
            row = (
                await conn.execute(
                    update(tenants)
                    .where(tenants.c.tenant_id == command.tenant_id)
                    .values(changes)
                    .returning(*_ACCOUNT_COLUMNS)
                )
            ).one_or_none()
            if row is None:
                raise _tenant_not_found(command.tenant_id)
            account = _account_from_row(row)
            await _record_admin_request(
                conn, command.request_id, request_fingerprint, "update_tenant", account, now
            )
            return TenantOutcome(account, request_fingerprint)

        try:
            return await self._db.write(change)
        except IntegrityError:
            prior = await self._prior_admin_request(command.request_id)
            if prior is None:
                raise
            return prior

    async def _prior_admin_request(self, request_id: str) -> TenantOutcome | None:
        return await self._db.read(lambda conn: _prior_admin_request(conn, request_id))


# Transaction bodies. Each takes an open connection inside one transaction.


async def _place_hold(
    conn: AsyncConnection,
    hold: Hold,
    create_with_limit: int | None,
    defer_credit_denial: bool,
    credit_denial_reason: DenialReason | None = None,
) -> Hold:
    assert hold.price is not None
    for _ in range(2):
        if hold.metered:
            taken = await _take_hold_for(conn, hold)
            snapshot = None
            if taken is None:
                # No room when the UPDATE ran; by the next statement another call may have
                # freed some (READ COMMITTED). The denial is decided on the row read under its
                # lock, which stays as read until commit: room found there is taken, and a
                # denial reports exactly the availability it was decided on.
                snapshot = await _get_account(conn, hold.tenant_id, lock=True)
                if snapshot is not None and _fits(snapshot, hold):
                    taken = await _take_hold_for(conn, hold)
            if taken is not None:
                account, budgeted = taken
                usages = (
                    await budget_store.locked_usages(
                        conn, hold.tenant_id, hold.user_id, hold.api_key_id, hold.created_at
                    )
                    if budgeted
                    else ()
                )
                exhausted = first_exhausted(usages, hold.amount_micros)
                if exhausted is not None:
                    return await _deny_by_budget(conn, hold, usages, exhausted)
                await budget_store.move_periods(conn, usages, held_delta=hold.amount_micros)
                stored = replace(
                    hold,
                    decision_available_micros=account.available_micros,
                    budgets=tuple(usage.after_hold(hold.amount_micros) for usage in usages),
                )
                await conn.execute(_INSERT_HOLD, _hold_row(stored))
                await _append_entry(
                    conn,
                    account,
                    EntryKind.HOLD,
                    hold.created_at,
                    hold_id=hold.hold_id,
                    held_delta=hold.amount_micros,
                )
                return stored
        else:
            # An included model moves no money: only the tenant's status matters.
            snapshot = await _get_account(conn, hold.tenant_id)
            if snapshot is not None and snapshot.status is TenantStatus.ACTIVE:
                stored = replace(
                    hold,
                    decision_available_micros=snapshot.available_micros,
                    budgets=await _budgets_now(conn, hold),
                )
                await conn.execute(_INSERT_HOLD, _hold_row(stored))
                return stored
        if snapshot is not None:
            # Kept so that a retry of this request replays the same denial.
            refusal = explain_refusal(snapshot, hold.model, hold.price, hold.amount_micros)
            denied = replace(
                hold,
                status=HoldStatus.DENIED,
                denial_reason=refusal.reason,
                decision_available_micros=refusal.available_micros,
                budgets=await _budgets_now(conn, hold),
            )
            if refusal.reason is DenialReason.CREDIT_LIMIT_REACHED:
                if defer_credit_denial:
                    return denied
                if credit_denial_reason is not None:
                    denied = replace(denied, denial_reason=credit_denial_reason)
            await conn.execute(_INSERT_HOLD, _hold_row(denied))
            return denied
        if create_with_limit is None:
            raise _tenant_not_found(hold.tenant_id)
        await _create_default_tenant(conn, hold.tenant_id, create_with_limit, hold.created_at)
    raise AssertionError("a tenant created in this transaction cannot vanish")


async def _deny_by_budget(
    conn: AsyncConnection, hold: Hold, usages: tuple[BudgetUsage, ...], exhausted: BudgetUsage
) -> Hold:
    """Gives back the tenant hold just taken (same transaction, row still locked) and stores
    the denial, so that a retry replays it."""
    account = await _move(conn, hold.tenant_id, 0, -hold.amount_micros)
    assert account is not None
    denied = replace(
        hold,
        status=HoldStatus.DENIED,
        denial_reason=DENIAL_REASONS[exhausted.budget.scope],
        decision_available_micros=account.available_micros,
        budgets=usages,
    )
    await conn.execute(_INSERT_HOLD, _hold_row(denied))
    return denied


async def _budgets_now(conn: AsyncConnection, hold: Hold) -> tuple[BudgetUsage, ...]:
    """The budgets of a call, read to explain a decision that takes nothing from them."""
    found = await budget_store.applicable_budgets(
        conn, hold.tenant_id, hold.user_id, hold.api_key_id
    )
    return tuple(
        [
            await budget_store.current_usage(conn, budget, hold.created_at, lock=False)
            for budget in found
        ]
    )


async def _take_hold(conn: AsyncConnection, tenant_id: str, amount_micros: int) -> Account | None:
    """The exposure cap: moves `amount_micros` into held only if it fits in available credit."""
    params = {"tenant": tenant_id, "amount": amount_micros}
    row = (await conn.execute(_TAKE_HOLD, params)).one_or_none()
    return None if row is None else _account_from_row(row)


async def _take_hold_for(conn: AsyncConnection, hold: Hold) -> tuple[Account, bool] | None:
    """_take_hold for a reservation; with the account after it, whether any budget applies."""
    if not (hold.user_id or hold.api_key_id):
        account = await _take_hold(conn, hold.tenant_id, hold.amount_micros)
        return None if account is None else (account, False)
    statement = _TAKE_HOLD_SEEING_BUDGETS[(bool(hold.user_id), bool(hold.api_key_id))]
    params = {
        "tenant": hold.tenant_id,
        "amount": hold.amount_micros,
        **budget_store.scope_params(hold.user_id, hold.api_key_id),
    }
    row = (await conn.execute(statement, params)).one_or_none()
    return None if row is None else (_account_from_row(row), bool(row.budgeted))


async def _commit(
    conn: AsyncConnection, command: Commit, request_fingerprint: str, now: datetime
) -> CommitOutcome:
    params = {"hold": command.reservation_id, "at": now}
    claimed = (await conn.execute(_CLAIM_FOR_COMMIT, params)).one_or_none()
    if claimed is None:
        prior = await _prior_commit(conn, command.request_id)
        if prior is not None:
            return prior
        check_committable(
            await _get_hold(conn, command.reservation_id), command.reservation_id, now
        )
        raise AssertionError("an open, unexpired hold is always claimable")
    hold = _hold_from_row(claimed)
    assert hold.price is not None
    cost = hold.price.cost_micros(command.usage)
    if hold.metered:
        settlement, account = await _debit(conn, hold, cost)
        await _append_entry(
            conn,
            account,
            EntryKind.DEBIT,
            now,
            hold_id=hold.hold_id,
            balance_delta=-settlement.charged_micros,
            held_delta=-hold.amount_micros,
        )
        source = PaymentSource.CREDIT
    else:
        settlement = Settlement(charged_micros=0, uncollected_micros=0)
        unchanged = await _get_account(conn, hold.tenant_id)
        assert unchanged is not None
        account = unchanged
        source = PaymentSource.INCLUDED
    record = UsageRecord(
        hold_id=hold.hold_id,
        tenant_id=hold.tenant_id,
        user_id=hold.user_id,
        model=hold.model,
        usage=command.usage,
        cost_micros=cost,
        charged_micros=settlement.charged_micros,
        uncollected_micros=settlement.uncollected_micros,
        held_micros=hold.amount_micros,
        payment_source=source,
        reserved_at=hold.created_at,
        committed_at=now,
        request_id=command.request_id,
        request_fingerprint=request_fingerprint,
    )
    await conn.execute(
        _INSERT_USAGE_RECORD,
        {**_usage_row(record), "available_after_micros": account.available_micros},
    )
    await add_to_rollup(conn, record)
    return CommitOutcome(record, account.available_micros)


async def _debit(conn: AsyncConnection, hold: Hold, cost_micros: int) -> tuple[Settlement, Account]:
    """Releases the hold and debits the cost, capped so the tenant never passes its limit."""
    if cost_micros <= hold.amount_micros:
        # Within the hold: it was granted inside the cap, so no read is needed to decide.
        settlement = Settlement(charged_micros=cost_micros, uncollected_micros=0)
    else:
        before = (await conn.execute(_LOCKED_ACCOUNT, {"tenant": hold.tenant_id})).one()
        room = _account_from_row(before).available_micros
        # A budget is overshot no more than the tenant: above the hold, only what fits in
        # every budget it took from is charged too.
        room = min((room, *await budget_store.relock(conn, hold.budgets)))
        settlement = settle(hold, cost_micros, room)
    account = await _move(conn, hold.tenant_id, -settlement.charged_micros, -hold.amount_micros)
    assert account is not None
    await budget_store.move_periods(
        conn,
        hold.budgets,
        spent_delta=settlement.charged_micros,
        held_delta=-hold.amount_micros,
    )
    return settlement, account


async def _extend_hold(
    conn: AsyncConnection,
    command: ExtendHold,
    request_fingerprint: str,
    ttl: timedelta,
    now: datetime,
) -> ExtendOutcome | None:
    """Grows the hold, or stores why not; expires it when it is due (returns None). Locks the
    hold, then its tenant, then the budget periods it took from: the order of a commit."""
    prior = await _prior_extension(conn, command.request_id)
    if prior is not None:
        return prior
    hold = await _locked_hold(conn, command.reservation_id)
    if not check_extendable(hold, command.reservation_id, now):
        assert hold is not None
        await _expire(conn, hold_id=hold.hold_id, now=now)
        return None
    assert hold is not None
    assert hold.price is not None
    amount = hold.price.output_micros(command.additional_output_tokens)
    if hold.metered:
        account = await _take_hold(conn, hold.tenant_id, amount)
        snapshot = None
        if account is None:
            # Decided on the row read under its lock, as for a reservation (see _place_hold).
            snapshot = await _get_account(conn, hold.tenant_id, lock=True)
            assert snapshot is not None
            if decide(snapshot, hold.model, hold.price, amount).allowed:
                account = await _take_hold(conn, hold.tenant_id, amount)
        if account is None:
            assert snapshot is not None
            refusal = explain_refusal(snapshot, hold.model, hold.price, amount)
            assert refusal.reason is not None
            usages = await budget_store.locked_hold_usages(conn, hold.budgets)
            return await _store_extension(
                conn,
                command,
                request_fingerprint,
                hold,
                amount,
                refusal.reason,
                refusal.available_micros,
                usages,
                now,
            )
        usages = await budget_store.locked_hold_usages(conn, hold.budgets)
        exhausted = first_exhausted(usages, amount)
        if exhausted is not None:
            # Gives back the tenant's part just taken (same transaction, row still locked).
            account = await _move(conn, hold.tenant_id, 0, -amount)
            assert account is not None
            return await _store_extension(
                conn,
                command,
                request_fingerprint,
                hold,
                amount,
                DENIAL_REASONS[exhausted.budget.scope],
                account.available_micros,
                usages,
                now,
            )
        await budget_store.move_periods(conn, hold.budgets, held_delta=amount)
        usages = tuple(usage.after_hold(amount) for usage in usages)
    else:
        # An included model moves no money: only the tenant's status matters.
        unchanged = await _get_account(conn, hold.tenant_id)
        assert unchanged is not None
        account = unchanged
        usages = ()
        decision = decide(account, hold.model, hold.price, amount)
        if decision.reason is not None:
            return await _store_extension(
                conn,
                command,
                request_fingerprint,
                hold,
                amount,
                decision.reason,
                account.available_micros,
                usages,
                now,
            )
    grown = replace(
        hold,
        amount_micros=hold.amount_micros + amount,
        extended_micros=hold.extended_micros + amount,
        expires_at=max(hold.expires_at, now + ttl),
        granted_expires_at=hold.granted_expires_at or hold.expires_at,
    )
    await conn.execute(
        update(holds)
        .where(holds.c.hold_id == hold.hold_id)
        .values(
            amount_micros=grown.amount_micros,
            extended_micros=grown.extended_micros,
            expires_at=grown.expires_at,
            granted_expires_at=grown.granted_expires_at,
        )
    )
    if amount:
        await _append_entry(
            conn, account, EntryKind.EXTENSION, now, hold_id=hold.hold_id, held_delta=amount
        )
    return await _store_extension(
        conn,
        command,
        request_fingerprint,
        grown,
        amount,
        None,
        account.available_micros,
        usages,
        now,
    )


async def _store_extension(
    conn: AsyncConnection,
    command: ExtendHold,
    request_fingerprint: str,
    hold_after: Hold,
    required_micros: int,
    denial_reason: DenialReason | None,
    available_micros: int,
    usages: tuple[BudgetUsage, ...],
    now: datetime,
) -> ExtendOutcome:
    """Keeps the answer so that a retry of the request replays it."""
    await conn.execute(
        insert(hold_extensions).values(
            request_id=command.request_id,
            request_fingerprint=request_fingerprint,
            hold_id=hold_after.hold_id,
            tenant_id=hold_after.tenant_id,
            required_micros=required_micros,
            denial_reason=denial_reason,
            amount_after_micros=hold_after.amount_micros,
            expires_at_after=hold_after.expires_at,
            decision_available_micros=available_micros,
            budgets=budget_store.usages_to_json(usages),
            created_at=now,
        )
    )
    return ExtendOutcome(
        _as_left(hold_after, hold_after.amount_micros, hold_after.expires_at),
        required_micros,
        denial_reason,
        available_micros,
        usages,
        request_fingerprint,
    )


def _extension_granted(row: Mapping[str, Any], request_fingerprint: str) -> ExtendOutcome:
    """The answer of the one-statement extension (postgres_hot_path.HotPath.extend) from the
    hold's row as it grew it: what _store_extension answers for a hold without budgets."""
    grown = _hold_from_row(SimpleNamespace(**row))
    return ExtendOutcome(
        _as_left(grown, grown.amount_micros, grown.expires_at),
        int(row["required_micros"]),
        None,
        int(row["available_after_micros"]),
        (),
        request_fingerprint,
    )


def _as_left(hold: Hold, amount_micros: int, expires_at: datetime) -> Hold:
    """The hold an extension answers with: open, with the amount and expire time the decision
    left it (the rest as granted), the same whether answered first or replayed."""
    return replace(hold.as_granted(), amount_micros=amount_micros, expires_at=expires_at)


async def _prior_extension(conn: AsyncConnection, request_id: str) -> ExtendOutcome | None:
    row = (
        await conn.execute(
            select(hold_extensions).where(hold_extensions.c.request_id == request_id)
        )
    ).one_or_none()
    if row is None:
        return None
    hold = await _get_hold(conn, row.hold_id)
    assert hold is not None
    return ExtendOutcome(
        # The hold as this answer left it, whatever happened to it since.
        _as_left(hold, row.amount_after_micros, row.expires_at_after),
        row.required_micros,
        None if row.denial_reason is None else DenialReason(row.denial_reason),
        row.decision_available_micros,
        budget_store.usages_from_json(row.budgets),
        row.request_fingerprint,
    )


async def _release(
    conn: AsyncConnection,
    request_id: str,
    reservation_id: str,
    reason: str,
    request_fingerprint: str,
    now: datetime,
) -> RefundOutcome | None:
    """Releases the hold, or expires it when it is due (returns None); a replay returns the
    stored answer."""
    hold = await _locked_hold(conn, reservation_id)
    try:
        action = decide_release(hold, reservation_id, now)
    except FailedPrecondition:
        # A retry of a release that already happened finds the hold in its new state.
        prior = await _prior_refund(conn, request_id)
        if prior is not None:
            return prior
        raise
    assert hold is not None
    if action is ReleaseAction.EXPIRE:
        # A request_id already used for something else is refused before anything changes.
        prior = await _prior_refund(conn, request_id)
        if prior is not None:
            return prior
        await _expire(conn, hold_id=hold.hold_id, now=now)
        return None
    await conn.execute(_RELEASE_HOLD, {"hold": hold.hold_id, "at": now})
    released = hold.amount_micros if hold.metered else 0
    account = await _move(conn, hold.tenant_id, 0, -released)
    assert account is not None
    if hold.metered:
        await budget_store.move_periods(conn, hold.budgets, held_delta=-released)
    await _append_entry(
        conn,
        account,
        EntryKind.RELEASE,
        now,
        hold_id=hold.hold_id,
        held_delta=-released,
        request_id=request_id,
        request_fingerprint=request_fingerprint,
        memo=reason or None,
    )
    return RefundOutcome(
        EntryKind.RELEASE, released, account.available_micros, 0, request_fingerprint
    )


async def _refund(
    conn: AsyncConnection, command: Refund, request_fingerprint: str, now: datetime
) -> RefundOutcome:
    hold = await _locked_hold(conn, command.reservation_id)
    try:
        committed = check_refundable(
            hold, command.reservation_id, now, refund_all=command.refund_all
        )
        return await _refund_charge(conn, committed, command, request_fingerprint, now)
    except FailedPrecondition:
        # A retry of a refund that already happened finds less left to refund.
        prior = await _prior_refund(conn, command.request_id)
        if prior is not None:
            return prior
        raise


async def _locked_hold(conn: AsyncConnection, hold_id: str) -> Hold | None:
    """The hold, its row locked until the transaction ends: a commit, release or sweep of it
    waits, then finds it as this transaction leaves it."""
    found = (await conn.execute(_LOCKED_HOLD, {"hold": hold_id})).one_or_none()
    return None if found is None else _hold_from_row(found)


async def _refund_charge(
    conn: AsyncConnection, hold: Hold, command: Refund, request_fingerprint: str, now: datetime
) -> RefundOutcome:
    charged = (
        await conn.execute(
            select(usage_records.c.charged_micros).where(usage_records.c.hold_id == hold.hold_id)
        )
    ).scalar_one()
    amount = refund_amount(hold, charged, command.amount_micros, command.refund_all)
    await conn.execute(
        update(holds)
        .where(holds.c.hold_id == hold.hold_id)
        .values(refunded_micros=holds.c.refunded_micros + amount)
    )
    account = await _move(conn, hold.tenant_id, amount, 0)
    assert account is not None
    await budget_store.move_periods(conn, hold.budgets, spent_delta=-amount)
    await _append_entry(
        conn,
        account,
        EntryKind.REFUND,
        now,
        hold_id=hold.hold_id,
        balance_delta=amount,
        request_id=command.request_id,
        request_fingerprint=request_fingerprint,
        memo=command.reason or None,
    )
    return RefundOutcome(
        EntryKind.REFUND,
        amount,
        account.available_micros,
        hold.refunded_micros + amount,
        request_fingerprint,
    )


async def _expire(conn: AsyncConnection, *, hold_id: str, now: datetime) -> int:
    row = (await conn.execute(_EXPIRE_HOLD, {"hold": hold_id, "at": now})).one_or_none()
    if row is None:
        return 0
    if row.billing == ModelBilling.METERED and row.amount_micros:
        account = await _move(conn, row.tenant_id, 0, -row.amount_micros)
        assert account is not None
        await budget_store.move_periods(
            conn, budget_store.usages_from_json(row.budgets), held_delta=-row.amount_micros
        )
        await _append_entry(
            conn, account, EntryKind.EXPIRY, now, hold_id=hold_id, held_delta=-row.amount_micros
        )
    return 1


# Statements shared by the bodies above.


async def _get_account(
    conn: AsyncConnection, tenant_id: str, *, lock: bool = False
) -> Account | None:
    query = _LOCKED_ACCOUNT if lock else _ACCOUNT
    row = (await conn.execute(query, {"tenant": tenant_id})).one_or_none()
    return None if row is None else _account_from_row(row)


def _fits(account: Account, hold: Hold) -> bool:
    """Whether the policy allows `hold` on `account` (the rule _TAKE_HOLD applies in SQL)."""
    return decide(account, hold.model, hold.price, hold.amount_micros).allowed


async def _get_hold(conn: AsyncConnection, hold_id: str) -> Hold | None:
    row = (await conn.execute(_HOLD, {"hold": hold_id})).one_or_none()
    return None if row is None else _hold_from_row(row)


async def _move(
    conn: AsyncConnection, tenant_id: str, balance_delta: int, held_delta: int
) -> Account | None:
    params = {"tenant": tenant_id, "balance_delta": balance_delta, "held_delta": held_delta}
    row = (await conn.execute(_MOVE, params)).one_or_none()
    return None if row is None else _account_from_row(row)


async def _append_entry(
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


async def _create_default_tenant(
    conn: AsyncConnection, tenant_id: str, credit_limit_micros: int, now: datetime
) -> None:
    row = _account_row(
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


async def _record_admin_request(
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
            result=_account_to_json(account),
            created_at=now,
        )
    )


async def _hold_by_request(conn: AsyncConnection, request_id: str) -> Hold | None:
    row = (await conn.execute(_HOLD_BY_REQUEST, {"request": request_id})).one_or_none()
    return None if row is None else _hold_from_row(row)


async def _due_holds(conn: AsyncConnection, now: datetime, limit: int) -> list[str]:
    due = await conn.execute(
        select(holds.c.hold_id)
        .where(due_hold_sql(literal(now, holds.c.expires_at.type)))
        .order_by(holds.c.expires_at)
        .limit(limit)
    )
    return list(due.scalars())


async def _prior_admin_request(conn: AsyncConnection, request_id: str) -> TenantOutcome | None:
    row = (
        await conn.execute(select(admin_requests).where(admin_requests.c.request_id == request_id))
    ).one_or_none()
    if row is None:
        return None
    return TenantOutcome(_account_from_json(row.result), row.request_fingerprint)


async def _prior_commit(conn: AsyncConnection, request_id: str) -> CommitOutcome | None:
    row = (await conn.execute(_USAGE_RECORD_BY_REQUEST, {"request": request_id})).one_or_none()
    if row is None:
        return None
    return CommitOutcome(_usage_from_row(row), row.available_after_micros)


async def _entry_by_request(conn: AsyncConnection, request_id: str) -> Row[Any] | None:
    return (await conn.execute(_ENTRY_BY_REQUEST, {"request": request_id})).one_or_none()


async def _prior_refund(conn: AsyncConnection, request_id: str) -> RefundOutcome | None:
    entry = await _entry_by_request(conn, request_id)
    if entry is None:
        return None
    kind = EntryKind(entry.kind)
    if kind not in (EntryKind.RELEASE, EntryKind.REFUND):
        # The request_id was used by another kind of call: report it as reused.
        return RefundOutcome(kind, 0, 0, 0, entry.request_fingerprint or "")
    refunded_total = 0
    if kind is EntryKind.REFUND:
        refunded_total = (
            await conn.execute(
                select(func.coalesce(func.sum(ledger_entries.c.balance_delta_micros), 0)).where(
                    ledger_entries.c.hold_id == entry.hold_id,
                    ledger_entries.c.kind == EntryKind.REFUND,
                    ledger_entries.c.entry_id <= entry.entry_id,
                )
            )
        ).scalar_one()
    amount = entry.balance_delta_micros if kind is EntryKind.REFUND else -entry.held_delta_micros
    return RefundOutcome(
        kind,
        amount,
        entry.available_after_micros,
        int(refunded_total),
        entry.request_fingerprint or "",
    )


def _tenant_not_found(tenant_id: str) -> NotFound:
    return NotFound(ErrorReason.TENANT_NOT_FOUND, f"tenant {tenant_id} does not exist")


# Row <-> domain conversions.


def _account_from_row(row: Any) -> Account:
    return Account(
        tenant_id=row.tenant_id,
        status=TenantStatus(row.status),
        credit_limit_micros=row.credit_limit_micros,
        payment_method_on_file=bool(row.payment_method_on_file),
        balance_micros=row.balance_micros,
        held_micros=row.held_micros,
        created_at=row.created_at,
        updated_at=row.updated_at,
        billing_status=BillingStatus(row.billing_status),
    )


def _account_row(account: Account) -> dict[str, Any]:
    return {
        "tenant_id": account.tenant_id,
        "status": account.status,
        "credit_limit_micros": account.credit_limit_micros,
        "payment_method_on_file": account.payment_method_on_file,
        "balance_micros": account.balance_micros,
        "held_micros": account.held_micros,
        "created_at": account.created_at,
        "updated_at": account.updated_at,
        "billing_status": account.billing_status,
    }


def _account_to_json(account: Account) -> str:
    body = asdict(account)
    for key in ("created_at", "updated_at"):
        value = body[key]
        body[key] = None if value is None else value.isoformat()
    return json.dumps(body, sort_keys=True)


def _account_from_json(text: str) -> Account:
    body = json.loads(text)
    for key in ("created_at", "updated_at"):
        value = body[key]
        body[key] = None if value is None else datetime.fromisoformat(value)
    body["status"] = TenantStatus(body["status"])
    body["billing_status"] = BillingStatus(body.get("billing_status", "good_standing"))
    return Account(**body)


def _balance_after(entry: Any) -> Balance:
    effective_limit = (
        entry.available_after_micros - entry.balance_after_micros + entry.held_after_micros
    )
    return Balance(entry.balance_after_micros, entry.held_after_micros, effective_limit)


def _hold_row(hold: Hold) -> dict[str, Any]:
    price = hold.price
    return {
        "hold_id": hold.hold_id,
        "request_id": hold.request_id,
        "request_fingerprint": hold.request_fingerprint,
        "tenant_id": hold.tenant_id,
        "user_id": hold.user_id,
        "model": hold.model,
        "billing": None if price is None else price.billing,
        "input_micros_per_mtok": 0 if price is None else price.input_micros_per_mtok,
        "cached_input_micros_per_mtok": 0 if price is None else price.cached_input_micros_per_mtok,
        "output_micros_per_mtok": 0 if price is None else price.output_micros_per_mtok,
        "flat_micros_per_call": 0 if price is None else price.flat_micros_per_call,
        "amount_micros": hold.amount_micros,
        "status": hold.status,
        "denial_reason": None if hold.denial_reason is None else hold.denial_reason,
        "decision_available_micros": hold.decision_available_micros,
        "refunded_micros": hold.refunded_micros,
        "created_at": hold.created_at,
        "expires_at": hold.expires_at,
        "settled_at": hold.settled_at,
        "api_key_id": hold.api_key_id,
        "budgets": budget_store.usages_to_json(hold.budgets),
        "extended_micros": hold.extended_micros,
        "granted_expires_at": hold.granted_expires_at,
    }


def _hold_from_row(row: Any) -> Hold:
    price = None
    if row.billing is not None:
        price = ModelPrice(
            model=row.model,
            billing=ModelBilling(row.billing),
            input_micros_per_mtok=row.input_micros_per_mtok,
            cached_input_micros_per_mtok=row.cached_input_micros_per_mtok,
            output_micros_per_mtok=row.output_micros_per_mtok,
            flat_micros_per_call=row.flat_micros_per_call,
        )
    return Hold(
        hold_id=row.hold_id,
        request_id=row.request_id,
        request_fingerprint=row.request_fingerprint,
        tenant_id=row.tenant_id,
        user_id=row.user_id,
        model=row.model,
        price=price,
        amount_micros=row.amount_micros,
        status=HoldStatus(row.status),
        created_at=row.created_at,
        expires_at=row.expires_at,
        decision_available_micros=row.decision_available_micros,
        denial_reason=None if row.denial_reason is None else DenialReason(row.denial_reason),
        settled_at=row.settled_at,
        refunded_micros=row.refunded_micros,
        api_key_id=row.api_key_id,
        budgets=budget_store.usages_from_json(row.budgets),
        extended_micros=row.extended_micros,
        granted_expires_at=row.granted_expires_at,
    )


def _usage_row(record: UsageRecord) -> dict[str, Any]:
    return {
        "hold_id": record.hold_id,
        "request_id": record.request_id,
        "request_fingerprint": record.request_fingerprint,
        "tenant_id": record.tenant_id,
        "user_id": record.user_id,
        "model": record.model,
        "input_tokens": record.usage.input_tokens,
        "cached_input_tokens": record.usage.cached_input_tokens,
        "output_tokens": record.usage.output_tokens,
        "cost_micros": record.cost_micros,
        "charged_micros": record.charged_micros,
        "uncollected_micros": record.uncollected_micros,
        "held_micros": record.held_micros,
        "payment_source": record.payment_source,
        "reserved_at": record.reserved_at,
        "committed_at": record.committed_at,
    }


def _usage_from_row(row: Any) -> UsageRecord:
    """From a SQLAlchemy row or an asyncpg record (the one-statement Commit's)."""
    get = (row._mapping if isinstance(row, Row) else row).__getitem__
    return UsageRecord(
        hold_id=get("hold_id"),
        tenant_id=get("tenant_id"),
        user_id=get("user_id"),
        model=get("model"),
        usage=TokenUsage(get("input_tokens"), get("cached_input_tokens"), get("output_tokens")),
        cost_micros=get("cost_micros"),
        charged_micros=get("charged_micros"),
        uncollected_micros=get("uncollected_micros"),
        held_micros=get("held_micros"),
        payment_source=PaymentSource(get("payment_source")),
        reserved_at=get("reserved_at"),
        committed_at=get("committed_at"),
        request_id=get("request_id"),
        request_fingerprint=get("request_fingerprint"),
    )
