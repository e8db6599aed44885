"""The ledger in SQL: LedgerStore, the one class the service uses for tenants, holds, usage
records and the append-only ledger. Each public method is one short transaction, whose body is a
function of the module that owns that part of the ledger:

- reservations: ReserveCredit (placing a hold, or storing why not);
- extensions: ExtendHold;
- settlement: Commit, Release, Refund and expiry;
- tenant_store: tenants, their admin requests and credit grants;
- replays: the stored answer of a request_id that was already used;
- ledger_statements and ledger_rows: the statements they share and the row <-> domain mapping.

The admission rule (tenant status, billing standing, and the exposure cap: a hold must fit in
the tenant's available credit) is defined once, in domain/admission.py; credit_sql.py compiles
it into the WHERE of the conditional UPDATE that takes a hold (ledger_statements.take_hold and
the one-statement paths of postgres_hot_path). That UPDATE moves the tenant's held amount only
if the rule admits it. It is atomic on PostgreSQL (the row lock is taken by the UPDATE and the
condition re-checked on the newest row version) and on SQLite (transactions are serialized by
BEGIN IMMEDIATE). No transaction decides anything from a value it read earlier without holding
the row's lock.

Idempotency keys are unique columns: holds.request_id (ReserveCredit), usage_records.request_id
(Commit), ledger_entries.request_id (Release, Refund, GrantCredit), hold_extensions.request_id
(ExtendHold), admin_requests.request_id. A retry hits the unique constraint, its transaction
rolls back whole, and the stored result is returned (replays).

A hold settles once. Commit, release and expiry each change it only while it is open, under its
row lock (the conditional UPDATE of the commit and the sweep; SELECT ... FOR UPDATE of a release
or a refund), and re-read it once they hold the lock: whichever comes second finds it settled and
says so. What each request may do to a hold in each state is decided in domain.ledger.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import partial

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billing_service.domain.budgets import BudgetUsage
from billing_service.domain.commands import (
    Commit,
    CreateTenant,
    ExtendHold,
    GrantCredit,
    Refund,
    Release,
    UpdateTenant,
)
from billing_service.domain.errors import AlreadyExists, ErrorReason
from billing_service.domain.ledger import EntryKind, hold_expired
from billing_service.domain.model import Account, DenialReason, Hold
from billing_service.domain.outcomes import (
    CommitOutcome,
    ExtendOutcome,
    GrantOutcome,
    RefundOutcome,
    ReleaseOutcome,
    TenantOutcome,
)
from billing_service.storage import (
    budget_store,
    extensions,
    ledger_rows,
    ledger_statements,
    postgres_hot_path,
    replays,
    reservations,
    settlement,
    tenant_store,
)
from billing_service.storage.database import Transactions, storage_faults_unavailable


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
        return await self._db.read(lambda conn: ledger_statements.get_account(conn, tenant_id))

    @storage_faults_unavailable
    async def get_hold(self, hold_id: str) -> Hold | None:
        return await self._db.read(lambda conn: ledger_statements.get_hold(conn, hold_id))

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
                lambda conn: reservations.place_hold(
                    conn, hold, create_with_limit, defer_credit_denial, credit_denial_reason
                )
            )
        except IntegrityError:
            return await self._prior_hold(hold.request_id)

    @storage_faults_unavailable
    async def find_hold(self, request_id: str) -> Hold | None:
        """The reservation made by a ReserveCredit with this request_id, if any."""
        return await self._db.read(lambda conn: ledger_statements.hold_by_request(conn, request_id))

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
                    return CommitOutcome(
                        ledger_rows.usage_from_row(row), row["available_after_micros"]
                    )
            return await self._db.write(
                lambda conn: settlement.commit(conn, command, request_fingerprint, now)
            )
        except IntegrityError:
            prior = await self._db.read(lambda conn: replays.prior_commit(conn, command.request_id))
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
                    return extensions.extension_granted(row, request_fingerprint)
            outcome = await self._db.write(
                lambda conn: extensions.extend_hold(conn, command, request_fingerprint, ttl, now)
            )
        except IntegrityError:
            prior = await self._db.read(
                lambda conn: replays.prior_extension(conn, command.request_id)
            )
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
                lambda conn: settlement.refund(conn, command, request_fingerprint, now)
            )
        except IntegrityError:
            prior = await self._db.read(lambda conn: replays.prior_refund(conn, command.request_id))
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
                lambda conn: settlement.release(
                    conn, request_id, reservation_id, reason, request_fingerprint, now
                )
            )
        except IntegrityError:
            prior = await self._db.read(lambda conn: replays.prior_refund(conn, request_id))
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
        due_ids = await self._db.read(lambda conn: ledger_statements.due_holds(conn, now, limit))
        released = 0
        for hold_id in due_ids:
            # One transaction per hold: it locks one tenant row at a time, never two.
            released += await self._db.write(partial(settlement.expire, hold_id=hold_id, now=now))
        return released

    # GrantCredit

    @storage_faults_unavailable
    async def grant(
        self, command: GrantCredit, request_fingerprint: str, now: datetime
    ) -> GrantOutcome:
        try:
            return await self._db.write(
                lambda conn: tenant_store.grant_credit(conn, command, request_fingerprint, now)
            )
        except IntegrityError:
            prior = await self._db.read(lambda conn: replays.prior_grant(conn, command.request_id))
            if prior is None:
                raise
            return prior

    # Tenants

    @storage_faults_unavailable
    async def create_tenant(
        self,
        command: CreateTenant,
        request_fingerprint: str,
        credit_limit_micros: int,
        now: datetime,
    ) -> TenantOutcome:
        try:
            return await self._db.write(
                lambda conn: tenant_store.create_tenant(
                    conn, command, request_fingerprint, credit_limit_micros, now
                )
            )
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
        try:
            return await self._db.write(
                lambda conn: tenant_store.update_tenant(conn, command, request_fingerprint, now)
            )
        except IntegrityError:
            prior = await self._prior_admin_request(command.request_id)
            if prior is None:
                raise
            return prior

    async def _prior_admin_request(self, request_id: str) -> TenantOutcome | None:
        return await self._db.read(lambda conn: replays.prior_admin_request(conn, request_id))
