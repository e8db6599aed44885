"""The charge outbox in SQL: charges decided, claimed, attempted and recorded.

Each public method is one short transaction, and the rules that guard money are conditions of
the statements themselves: a charge row is inserted only if no other charge of the tenant is
pending (a partial unique index), with the tenant's customer and card of that moment, an
automatic one only if it fits under the tenant's monthly ceiling (counted in the same
statement, storage.charge_sql), a charge's status moves only along
domain.payments.ALLOWED_BEFORE (a conditional UPDATE), a worker acts on a charge only while
its claim is the charge's current one, and the TOP_UP credit is written by the one transaction
whose UPDATE moved the charge into SUCCEEDED.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, insert, literal, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billing_service.domain.ledger import EntryKind
from billing_service.domain.model import TenantStatus
from billing_service.domain.money import AMOUNT_MICROS_MAX
from billing_service.domain.payments import (
    ALLOWED_BEFORE,
    MAY_TAKE_MONEY,
    MONTHLY_LIMIT_TOP_UPS_DEFAULT,
    OPEN_STATUSES,
    STATUS_AFTER_CHARGE,
    TOOK_MONEY,
    AutoTopUp,
    BillingStatus,
    Charge,
    ChargeStatus,
    ChargeTrigger,
    month_start,
)
from billing_service.storage.charge_sql import (
    automatic_charges_sql,
    charge_from_row,
    charge_row,
    decides_billing_status,
)
from billing_service.storage.credit_sql import available_credit_sql
from billing_service.storage.database import storage_faults_unavailable, transaction
from billing_service.storage.ledger_statements import append_entry, move
from billing_service.storage.tables import charges, tenants


@dataclass(frozen=True, slots=True)
class ClaimedCharge:
    """A pending charge a worker now owns until its lease ends (or another claim replaces
    `claim_token`), with the tenant's card and status as of the claim."""

    charge: Charge
    claim_token: str
    card_on_file: str | None
    tenant_active: bool


@dataclass(frozen=True, slots=True)
class Recorded:
    """A charge after an attempt to record an outcome; `moved`: this call changed it."""

    charge: Charge | None
    moved: bool


@dataclass(frozen=True, slots=True)
class ChargeGauges:
    """Database-wide counts of charges without an outcome, for the operators' alerts."""

    open_charges: int
    oldest_open_created_at: datetime | None
    unresolved: int


class ChargeOutbox:
    """The charge half of PaymentsStore."""

    def __init__(self, engine: AsyncEngine, defaults: AutoTopUp, currency: str = "usd") -> None:
        self._engine = engine
        self._defaults = defaults
        # The currency every new charge is made in (Settings.stripe_currency).
        self._currency = currency
        self._postgres = engine.dialect.name == "postgresql"

    @property
    def defaults(self) -> AutoTopUp:
        return self._defaults

    @storage_faults_unavailable
    async def enqueue_charge(self, charge: Charge) -> Charge | None:
        """Writes a pending charge of the tenant's card on file as it is now (None: the tenant
        has no card, nothing written); if the tenant has one pending already, returns that
        one (or, for a request_id seen before, the charge it made)."""
        row = {
            name: value
            for name, value in charge_row(charge).items()
            if name not in _FIXED_BY_THE_TENANT
        }
        chosen = select(
            *(literal(value, charges.c[name].type) for name, value in row.items()),
            tenants.c.stripe_customer_id,
            tenants.c.payment_method_id,
            literal(self._currency),
        ).where(
            tenants.c.tenant_id == charge.tenant_id,
            tenants.c.payment_method_id.is_not(None),
            tenants.c.stripe_customer_id.is_not(None),
        )
        statement = insert(charges).from_select([*row, *_FIXED_BY_THE_TENANT], chosen)
        try:
            async with transaction(self._engine) as conn:
                if not (await conn.execute(statement)).rowcount:
                    return None
            return await self.get_charge(charge.charge_id)
        except IntegrityError:
            async with self._engine.connect() as conn:
                if charge.request_id is not None:
                    prior = await _charge_where(conn, charges.c.request_id == charge.request_id)
                    if prior is not None:
                        return prior
                pending = await _charge_where(
                    conn,
                    charges.c.tenant_id == charge.tenant_id,
                    charges.c.status == ChargeStatus.PENDING,
                )
            if pending is None:
                raise
            return pending

    @storage_faults_unavailable
    async def enqueue_automatic(
        self,
        tenant_id: str,
        charge_id: str,
        now: datetime,
        *,
        at_least_micros: int | None = None,
        hold_micros: int = 0,
    ) -> bool:
        """Decides and writes a top-up in one statement: only for an active tenant with a card
        in good standing and auto top-up on, only if no charge of the tenant is pending, and
        only if the charge fits whole under the tenant's monthly ceiling.

        at_least_micros None: an automatic top-up, only when available credit is under the
        tenant's threshold. Else an on-demand top-up (a reservation of `hold_micros` found no
        room) of the tenant's top-up amount or `at_least_micros` if that is more (whole cents),
        only while the tenant still has no room for that hold: credit that landed since the
        denial (another reservation's top-up) is used, not charged for again.
        """
        amount = self._charge_amount_sql(at_least_micros)
        conditions = (
            *self._top_up_rule(on_demand_hold_micros=_on_demand(at_least_micros, hold_micros)),
            self._under_ceiling_sql(amount, now),
        )
        trigger = ChargeTrigger.AUTOMATIC if at_least_micros is None else ChargeTrigger.ON_DEMAND
        chosen = select(
            literal(charge_id),
            tenants.c.tenant_id,
            amount,
            literal(str(trigger)),
            literal(str(ChargeStatus.PENDING)),
            literal(now, charges.c.created_at.type),
            literal(now, charges.c.updated_at.type),
            tenants.c.stripe_customer_id,
            tenants.c.payment_method_id,
            literal(self._currency),
        )
        # FOR UPDATE: on PostgreSQL a charge landing meanwhile (its credit and its leaving
        # pending commit together) makes this re-read the tenant row once it commits, instead
        # of deciding on the snapshot where that charge was still pending and uncredited.
        chosen = chosen.where(tenants.c.tenant_id == tenant_id, *conditions).with_for_update(
            of=tenants
        )
        statement = insert(charges).from_select(
            [
                "charge_id",
                "tenant_id",
                "amount_micros",
                "trigger",
                "status",
                "created_at",
                "updated_at",
                *_FIXED_BY_THE_TENANT,
            ],
            chosen,
        )
        try:
            async with transaction(self._engine) as conn:
                return bool((await conn.execute(statement)).rowcount)
        except IntegrityError:
            return False  # a charge of this tenant is already pending

    @storage_faults_unavailable
    async def ceiling_blocks_top_up(
        self,
        tenant_id: str,
        now: datetime,
        *,
        at_least_micros: int | None = None,
        hold_micros: int = 0,
    ) -> bool:
        """True if the tenant would get a top-up (as enqueue_automatic decides it) but for the
        monthly ceiling. Only explains a refusal; the decision itself is enqueue_automatic's."""
        amount = self._charge_amount_sql(at_least_micros)
        async with self._engine.connect() as conn:
            found = await conn.execute(
                select(tenants.c.tenant_id).where(
                    tenants.c.tenant_id == tenant_id,
                    *self._top_up_rule(
                        on_demand_hold_micros=_on_demand(at_least_micros, hold_micros)
                    ),
                    ~self._under_ceiling_sql(amount, now),
                )
            )
            return found.first() is not None

    @storage_faults_unavailable
    async def tenants_due_for_top_up(self, limit: int, now: datetime | None = None) -> list[str]:
        """Tenants that get an automatic top-up now (the candidates of enqueue_automatic)."""
        pending = select(charges.c.tenant_id).where(charges.c.status == ChargeStatus.PENDING)
        amount = self._charge_amount_sql(None)
        async with self._engine.connect() as conn:
            found = await conn.execute(
                select(tenants.c.tenant_id)
                .where(
                    *self._top_up_rule(on_demand_hold_micros=None),
                    tenants.c.tenant_id.not_in(pending),
                    self._under_ceiling_sql(amount, now or datetime.now(UTC)),
                )
                .limit(limit)
            )
            return [str(tenant_id) for tenant_id in found.scalars()]

    def _top_up_rule(self, *, on_demand_hold_micros: int | None) -> tuple[Any, ...]:
        """Automatic (None): credit under the threshold. On demand: credit still short of the
        hold that found no room, whatever the threshold."""
        if on_demand_hold_micros is None:
            threshold = _or_default(
                tenants.c.auto_top_up_threshold_micros, self._defaults.threshold_micros
            )
        else:
            threshold = literal(on_demand_hold_micros, tenants.c.balance_micros.type)
        return _auto_top_up_due(threshold)

    def _charge_amount_sql(self, at_least_micros: int | None) -> Any:
        amount = _or_default(tenants.c.auto_top_up_amount_micros, self._defaults.amount_micros)
        if at_least_micros is None:
            return amount
        return case((amount < at_least_micros, literal(at_least_micros)), else_=amount)

    def _monthly_limit_sql(self) -> Any:
        """The tenant's ceiling (domain.payments.default_monthly_limit when it has none)."""
        configured = self._defaults.monthly_limit_micros
        if configured is not None:
            default: Any = literal(configured, tenants.c.top_up_monthly_limit_micros.type)
        else:
            tenfold = self._charge_amount_sql(None) * MONTHLY_LIMIT_TOP_UPS_DEFAULT
            default = case((tenfold > AMOUNT_MICROS_MAX, literal(AMOUNT_MICROS_MAX)), else_=tenfold)
        column = tenants.c.top_up_monthly_limit_micros
        return case((column.is_(None), default), else_=column)

    def _under_ceiling_sql(self, amount: Any, now: datetime) -> Any:
        """A new automatic charge of `amount` fits: what the automatic charges made this month
        (since the last manual top-up, if later) took or may still take, plus it, at most
        the ceiling."""
        counted = automatic_charges_sql(month_start(now), MAY_TAKE_MONEY, since_manual_top_up=True)
        return counted + amount <= self._monthly_limit_sql()

    @storage_faults_unavailable
    async def claim_due(self, now: datetime, lease: timedelta, limit: int) -> list[ClaimedCharge]:
        """Takes up to `limit` pending charges that are due (no live lease, no retry delay
        running), the most overdue first; SKIP LOCKED shares them out across replicas, and a
        claim's token fences whoever held the charge before."""
        due = (
            select(charges.c.charge_id)
            .where(
                charges.c.status == ChargeStatus.PENDING,
                or_(charges.c.lease_until.is_(None), charges.c.lease_until <= now),
            )
            .order_by(
                func.coalesce(charges.c.lease_until, charges.c.created_at), charges.c.charge_id
            )
            .limit(limit)
        )
        if self._postgres:
            due = due.with_for_update(skip_locked=True)
        claimed: list[ClaimedCharge] = []
        async with transaction(self._engine) as conn:
            for charge_id in list((await conn.execute(due)).scalars()):
                token = uuid.uuid4().hex
                row = (
                    await conn.execute(
                        update(charges)
                        .where(
                            charges.c.charge_id == charge_id,
                            charges.c.status == ChargeStatus.PENDING,
                            or_(charges.c.lease_until.is_(None), charges.c.lease_until <= now),
                        )
                        .values(
                            lease_until=now + lease,
                            attempts=charges.c.attempts + 1,
                            claim_token=token,
                        )
                        .returning(*charges.c)
                    )
                ).one_or_none()
                if row is None:
                    continue  # another worker (SQLite: another connection) took it first
                tenant = (
                    await conn.execute(
                        select(tenants.c.payment_method_id, tenants.c.status).where(
                            tenants.c.tenant_id == row.tenant_id
                        )
                    )
                ).one()
                claimed.append(
                    ClaimedCharge(
                        charge_from_row(row),
                        token,
                        tenant.payment_method_id,
                        tenant.status == TenantStatus.ACTIVE,
                    )
                )
        return claimed

    @storage_faults_unavailable
    async def begin_attempt(self, charge_id: str, claim_token: str, now: datetime) -> bool:
        """Just before a request for the charge goes to Stripe: still pending and still ours
        (re-read under the claim), and from now on it may have reached Stripe."""
        async with transaction(self._engine) as conn:
            result = await conn.execute(
                update(charges)
                .where(*_owned(charge_id, claim_token))
                .values(
                    sent_at=func.coalesce(charges.c.sent_at, literal(now, charges.c.sent_at.type))
                )
            )
        return bool(result.rowcount)

    @storage_faults_unavailable
    async def retry_later(
        self,
        charge_id: str,
        claim_token: str,
        not_before: datetime,
        now: datetime,
        *,
        payment_intent_id: str | None = None,
    ) -> bool:
        """The attempt learned no outcome: the charge stays pending, due again at
        `not_before` (remembering its PaymentIntent id when one became known). False if the
        claim was replaced meanwhile."""
        values: dict[str, Any] = {"lease_until": not_before, "updated_at": now}
        if payment_intent_id is not None:
            values["payment_intent_id"] = payment_intent_id
        async with transaction(self._engine) as conn:
            result = await conn.execute(
                update(charges).where(*_owned(charge_id, claim_token)).values(values)
            )
        return bool(result.rowcount)

    @storage_faults_unavailable
    async def get_charge(self, charge_id: str) -> Charge | None:
        async with self._engine.connect() as conn:
            return await _charge_where(conn, charges.c.charge_id == charge_id)

    @storage_faults_unavailable
    async def charges_of(self, tenant_id: str) -> list[Charge]:
        """The tenant's charges, oldest first."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(charges)
                .where(charges.c.tenant_id == tenant_id)
                .order_by(charges.c.created_at, charges.c.charge_id)
            )
            return [charge_from_row(row) for row in rows]

    @storage_faults_unavailable
    async def list_charges(
        self,
        status: ChargeStatus | None,
        tenant_id: str | None,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[Charge]:
        """Charges in (creation time, id) order after `after`, optionally of one status and
        one tenant."""
        query = select(charges)
        if status is not None:
            query = query.where(charges.c.status == status)
        if tenant_id is not None:
            query = query.where(charges.c.tenant_id == tenant_id)
        if after is not None:
            created_at, charge_id = after
            query = query.where(
                or_(
                    charges.c.created_at > created_at,
                    and_(charges.c.created_at == created_at, charges.c.charge_id > charge_id),
                )
            )
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                query.order_by(charges.c.created_at, charges.c.charge_id).limit(limit)
            )
            return [charge_from_row(row) for row in rows]

    @storage_faults_unavailable
    async def pending_charge(self, tenant_id: str) -> Charge | None:
        async with self._engine.connect() as conn:
            return await _charge_where(
                conn, charges.c.tenant_id == tenant_id, charges.c.status == ChargeStatus.PENDING
            )

    @storage_faults_unavailable
    async def get_charge_by_request(self, request_id: str) -> Charge | None:
        async with self._engine.connect() as conn:
            return await _charge_where(conn, charges.c.request_id == request_id)

    @storage_faults_unavailable
    async def charge_of_payment_intent(self, payment_intent_id: str) -> Charge | None:
        async with self._engine.connect() as conn:
            return await _charge_where(conn, charges.c.payment_intent_id == payment_intent_id)

    @storage_faults_unavailable
    async def charge_gauges(self) -> ChargeGauges:
        async with self._engine.connect() as conn:
            return await charge_gauges(conn)

    @storage_faults_unavailable
    async def record_outcome(
        self,
        charge_id: str,
        status: ChargeStatus,
        payment_intent_id: str | None,
        failure_message: str | None,
        now: datetime,
        *,
        card_problem: bool = True,
        claim_token: str | None = None,
        only_from: frozenset[ChargeStatus] | None = None,
        unleased: bool = False,
    ) -> Recorded:
        """Moves the charge to `status` if its current status allows (and, given, it is in
        `only_from`, the claim is still `claim_token`'s, or no worker holds a lease on it
        now when `unleased`). On success credits the balance once. The outcome of the
        tenant's latest charge sets its billing status (a failure only with the card on file
        and unless `card_problem` is False). The charge as it is after (None: no such
        charge) and whether this call moved it."""
        allowed = ALLOWED_BEFORE[status]
        if only_from is not None:
            allowed = allowed & only_from
        conditions: list[Any] = [
            charges.c.charge_id == charge_id,
            charges.c.status.in_([str(before) for before in allowed]),
        ]
        if claim_token is not None:
            conditions.append(charges.c.claim_token == claim_token)
        if unleased:
            conditions.append(or_(charges.c.lease_until.is_(None), charges.c.lease_until <= now))
        values: dict[str, Any] = {
            "status": status,
            "failure_message": None if status is ChargeStatus.SUCCEEDED else failure_message,
            "lease_until": None,
            "claim_token": None,
            "updated_at": now,
        }
        if payment_intent_id is not None:
            values["payment_intent_id"] = payment_intent_id
        async with transaction(self._engine) as conn:
            # The tenant row first, as enqueue_automatic takes it: it locks that row and then
            # waits on this charge's pending entry, so taking them the other way round here
            # would deadlock with it.
            await conn.execute(
                select(tenants.c.tenant_id)
                .where(
                    tenants.c.tenant_id
                    == select(charges.c.tenant_id)
                    .where(charges.c.charge_id == charge_id)
                    .scalar_subquery()
                )
                .with_for_update()
            )
            moved = (
                await conn.execute(
                    update(charges).where(*conditions).values(values).returning(*charges.c)
                )
            ).one_or_none()
            if moved is None:
                return Recorded(await _charge_where(conn, charges.c.charge_id == charge_id), False)
            charge = charge_from_row(moved)
            if status is ChargeStatus.SUCCEEDED:
                charge = await credit_top_up(conn, charge, now)
            elif card_problem and (problem := STATUS_AFTER_CHARGE.get(status)):
                await conn.execute(
                    update(tenants)
                    .where(*decides_billing_status(charge, problem=True))
                    .values(billing_status=problem, updated_at=now)
                )
            return Recorded(charge, True)

    @storage_faults_unavailable
    async def reverse_top_up(
        self, payment_intent_id: str, reversed_total_micros: int | None, now: datetime
    ) -> Charge | None:
        """Takes back what Stripe refunded (cumulative `reversed_total_micros`; None: all of
        it, for a dispute) with one TOP_UP_REVERSAL entry per increase, never twice."""
        async with transaction(self._engine) as conn:
            row = (
                await conn.execute(
                    select(charges)
                    .where(charges.c.payment_intent_id == payment_intent_id)
                    .with_for_update()
                )
            ).first()
            if row is None:
                return None
            charge = charge_from_row(row)
            target = (
                charge.amount_micros if reversed_total_micros is None else reversed_total_micros
            )
            target = min(target, charge.amount_micros)
            if target <= charge.refunded_micros:
                return charge
            credited = charge.status in TOOK_MONEY
            if credited:
                await _append_reversal(conn, charge, target - charge.refunded_micros, now)
            # Before its success is recorded, the refund is only remembered: the credit
            # written then takes it back (see credit_top_up).
            values: dict[str, Any] = {"refunded_micros": target, "updated_at": now}
            if credited:
                values["status"] = ChargeStatus.REFUNDED
            await conn.execute(
                update(charges).where(charges.c.charge_id == charge.charge_id).values(values)
            )
            return replace(
                charge,
                refunded_micros=target,
                status=ChargeStatus.REFUNDED if credited else charge.status,
            )


async def credit_top_up(conn: AsyncConnection, charge: Charge, now: datetime) -> Charge:
    account = await move(conn, charge.tenant_id, charge.amount_micros, 0)
    assert account is not None
    await append_entry(
        conn,
        account,
        EntryKind.TOP_UP,
        now,
        balance_delta=charge.amount_micros,
        memo=f"card charge {charge.payment_intent_id}",
        charge_id=charge.charge_id,
    )
    await conn.execute(
        update(tenants)
        .where(*decides_billing_status(charge, problem=False))
        .values(billing_status=BillingStatus.GOOD_STANDING, updated_at=now)
    )
    if charge.refunded_micros:
        await _append_reversal(conn, charge, charge.refunded_micros, now)
        await conn.execute(
            update(charges)
            .where(charges.c.charge_id == charge.charge_id)
            .values(status=ChargeStatus.REFUNDED)
        )
        return replace(charge, status=ChargeStatus.REFUNDED)
    return charge


async def _append_reversal(
    conn: AsyncConnection, charge: Charge, amount_micros: int, now: datetime
) -> None:
    account = await move(conn, charge.tenant_id, -amount_micros, 0)
    assert account is not None
    await append_entry(
        conn,
        account,
        EntryKind.TOP_UP_REVERSAL,
        now,
        balance_delta=-amount_micros,
        memo=f"card charge {charge.payment_intent_id} refunded or disputed",
        charge_id=charge.charge_id,
    )


def _on_demand(at_least_micros: int | None, hold_micros: int) -> int | None:
    """The hold an on-demand top-up is for; None for an automatic one."""
    return None if at_least_micros is None else hold_micros


def _auto_top_up_due(threshold: Any) -> tuple[Any, ...]:
    """The automatic top-up rule, as SQL conditions on the tenant row (the threshold last)."""
    return (
        tenants.c.status == TenantStatus.ACTIVE,
        tenants.c.billing_status == BillingStatus.GOOD_STANDING,
        tenants.c.payment_method_id.is_not(None),
        tenants.c.stripe_customer_id.is_not(None),
        tenants.c.auto_top_up_enabled.is_(True),
        available_credit_sql() < threshold,
    )


# The charge columns a new charge takes from the tenant row when it is written.
_FIXED_BY_THE_TENANT = ("stripe_customer_id", "payment_method_id", "currency")


def _owned(charge_id: str, claim_token: str) -> tuple[Any, ...]:
    """The charge is still pending and the claim is still this worker's."""
    return (
        charges.c.charge_id == charge_id,
        charges.c.status == ChargeStatus.PENDING,
        charges.c.claim_token == claim_token,
    )


async def charge_gauges(conn: AsyncConnection) -> ChargeGauges:
    """One read: charges without an outcome, the oldest one, those waiting for an operator."""
    is_open = charges.c.status.in_([str(status) for status in OPEN_STATUSES])
    unresolved = case((charges.c.status == ChargeStatus.UNRESOLVED, 1), else_=0)
    count, oldest, waiting = (
        await conn.execute(
            select(func.count(), func.min(charges.c.created_at), func.sum(unresolved)).where(
                is_open
            )
        )
    ).one()
    return ChargeGauges(int(count), oldest, int(waiting or 0))


def _or_default(column: Any, default: int) -> Any:
    return case((column.is_(None), literal(default, column.type)), else_=column)


async def _charge_where(conn: AsyncConnection, *conditions: Any) -> Charge | None:
    row = (await conn.execute(select(charges).where(and_(*conditions)))).first()
    return None if row is None else charge_from_row(row)
