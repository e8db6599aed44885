"""Payments in SQL: Stripe customers, saved cards, billing status and the charge outbox.

Each public method is one short transaction. The rules that guard money are conditions of the
statements themselves: a charge row is inserted only if no other charge of the tenant is
pending (a partial unique index), an automatic one only if it fits under the tenant's monthly
ceiling (counted from the ledger in the same statement), a charge's status moves only along
domain.payments.ALLOWED_BEFORE (a conditional UPDATE), and the TOP_UP credit is written by the
one transaction whose UPDATE moved the charge into SUCCEEDED.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, insert, literal, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billing_service.domain.ledger import EntryKind
from billing_service.domain.model import Account, TenantStatus
from billing_service.domain.money import AMOUNT_MICROS_MAX
from billing_service.domain.payments import (
    ALLOWED_BEFORE,
    AUTOMATIC_TRIGGERS,
    MONTHLY_LIMIT_TOP_UPS_DEFAULT,
    STATUS_AFTER_CHARGE,
    AutoTopUp,
    BillingProfile,
    BillingStatus,
    Card,
    Charge,
    ChargeStatus,
    ChargeTrigger,
    default_monthly_limit,
    month_start,
)
from billing_service.storage.credit_sql import available_credit_sql
from billing_service.storage.database import storage_faults_unavailable, transaction
from billing_service.storage.ledger_store import (
    _ACCOUNT_COLUMNS,
    _account_from_row,
    _append_entry,
    _move,
)
from billing_service.storage.tables import account_requests, charges, ledger_entries, tenants

_PROBLEMS = (BillingStatus.PAYMENT_FAILED, BillingStatus.ACTION_REQUIRED)


@dataclass(frozen=True, slots=True)
class ClaimedCharge:
    """A pending charge a worker now owns until its lease ends, with what Stripe needs."""

    charge: Charge
    stripe_customer_id: str | None
    payment_method_id: str | None


@dataclass(frozen=True, slots=True)
class StoredRequest:
    request_fingerprint: str
    result: dict[str, Any]


class PaymentsStore:
    def __init__(self, engine: AsyncEngine, defaults: AutoTopUp) -> None:
        self._engine = engine
        self._defaults = defaults
        self._postgres = engine.dialect.name == "postgresql"

    @property
    def defaults(self) -> AutoTopUp:
        return self._defaults

    # Profiles and cards

    @storage_faults_unavailable
    async def get_profile(
        self, tenant_id: str, now: datetime | None = None
    ) -> BillingProfile | None:
        charged = _automatic_top_ups_sql(month_start(now or datetime.now(UTC)))
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(tenants, charged.label("automatic_top_ups_this_month_micros")).where(
                        tenants.c.tenant_id == tenant_id
                    )
                )
            ).one_or_none()
            if row is None:
                return None
            pending = (
                await conn.execute(
                    select(charges).where(
                        charges.c.tenant_id == tenant_id,
                        charges.c.status == ChargeStatus.PENDING,
                    )
                )
            ).one_or_none()
        return self._profile(row, None if pending is None else _charge_from_row(pending))

    @storage_faults_unavailable
    async def get_account(self, tenant_id: str) -> Account | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(*_ACCOUNT_COLUMNS).where(tenants.c.tenant_id == tenant_id)
                )
            ).one_or_none()
        return None if row is None else _account_from_row(row)

    @storage_faults_unavailable
    async def set_customer(self, tenant_id: str, customer_id: str, now: datetime) -> str:
        """Keeps the first customer stored for the tenant; returns the tenant's customer id."""
        async with transaction(self._engine) as conn:
            await conn.execute(
                update(tenants)
                .where(tenants.c.tenant_id == tenant_id, tenants.c.stripe_customer_id.is_(None))
                .values(stripe_customer_id=customer_id, updated_at=now)
            )
            stored = (
                await conn.execute(
                    select(tenants.c.stripe_customer_id).where(tenants.c.tenant_id == tenant_id)
                )
            ).scalar_one()
        return str(stored)

    @storage_faults_unavailable
    async def tenant_of_customer(self, customer_id: str) -> str | None:
        async with self._engine.connect() as conn:
            found = (
                await conn.execute(
                    select(tenants.c.tenant_id).where(tenants.c.stripe_customer_id == customer_id)
                )
            ).first()
        return None if found is None else str(found[0])

    @storage_faults_unavailable
    async def save_card(self, tenant_id: str, card: Card, now: datetime) -> None:
        """The card becomes the tenant's card on file; a payment problem is cleared."""
        async with transaction(self._engine) as conn:
            await conn.execute(
                update(tenants)
                .where(tenants.c.tenant_id == tenant_id)
                .values(
                    payment_method_id=card.payment_method_id,
                    card_brand=card.brand,
                    card_last4=card.last4,
                    card_saved_at=card.saved_at or now,
                    payment_method_on_file=True,
                    billing_status=_cleared_status(),
                    updated_at=now,
                )
            )

    @storage_faults_unavailable
    async def forget_card(
        self, tenant_id: str, payment_method_id: str | None, now: datetime
    ) -> bool:
        """Forgets the card (only `payment_method_id` when given); True if one was forgotten."""
        condition: Any = tenants.c.payment_method_id.is_not(None)
        if payment_method_id is not None:
            condition = tenants.c.payment_method_id == payment_method_id
        async with transaction(self._engine) as conn:
            result = await conn.execute(
                update(tenants)
                .where(tenants.c.tenant_id == tenant_id, condition)
                .values(
                    payment_method_id=None,
                    card_brand=None,
                    card_last4=None,
                    card_saved_at=None,
                    payment_method_on_file=False,
                    updated_at=now,
                )
            )
        return bool(result.rowcount)

    @storage_faults_unavailable
    async def tenants_with_card(self, payment_method_id: str) -> list[str]:
        async with self._engine.connect() as conn:
            found = await conn.execute(
                select(tenants.c.tenant_id).where(tenants.c.payment_method_id == payment_method_id)
            )
            return [str(tenant_id) for tenant_id in found.scalars()]

    @storage_faults_unavailable
    async def cards_on_file(self, after_tenant_id: str, limit: int) -> list[tuple[str, str, str]]:
        """(tenant, customer, payment method) of tenants with a card, in tenant order."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(
                    tenants.c.tenant_id, tenants.c.stripe_customer_id, tenants.c.payment_method_id
                )
                .where(
                    tenants.c.payment_method_id.is_not(None),
                    tenants.c.tenant_id > after_tenant_id,
                )
                .order_by(tenants.c.tenant_id)
                .limit(limit)
            )
            return [(r.tenant_id, r.stripe_customer_id or "", r.payment_method_id) for r in rows]

    @storage_faults_unavailable
    async def update_auto_top_up(
        self,
        tenant_id: str,
        enabled: bool | None,
        threshold_micros: int | None,
        amount_micros: int | None,
        now: datetime,
        monthly_limit_micros: int | None = None,
    ) -> BillingProfile | None:
        changes: dict[str, Any] = {"updated_at": now}
        if monthly_limit_micros is not None:
            changes["top_up_monthly_limit_micros"] = monthly_limit_micros
        if enabled is not None:
            changes["auto_top_up_enabled"] = enabled
        if threshold_micros is not None:
            changes["auto_top_up_threshold_micros"] = threshold_micros
        if amount_micros is not None:
            changes["auto_top_up_amount_micros"] = amount_micros
        async with transaction(self._engine) as conn:
            result = await conn.execute(
                update(tenants).where(tenants.c.tenant_id == tenant_id).values(changes)
            )
        if not result.rowcount:
            return None
        return await self.get_profile(tenant_id, now)

    @storage_faults_unavailable
    async def list_accounts(
        self, billing_status: BillingStatus | None, after_tenant_id: str, limit: int
    ) -> list[Account]:
        query = select(*_ACCOUNT_COLUMNS).where(tenants.c.tenant_id > after_tenant_id)
        if billing_status is not None:
            query = query.where(tenants.c.billing_status == billing_status)
        async with self._engine.connect() as conn:
            rows = await conn.execute(query.order_by(tenants.c.tenant_id).limit(limit))
            return [_account_from_row(row) for row in rows]

    # Idempotent AccountService requests

    @storage_faults_unavailable
    async def find_request(self, request_id: str) -> StoredRequest | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(account_requests).where(account_requests.c.request_id == request_id)
                )
            ).one_or_none()
        if row is None:
            return None
        return StoredRequest(row.request_fingerprint, json.loads(row.result))

    @storage_faults_unavailable
    async def record_request(
        self,
        request_id: str,
        request_fingerprint: str,
        operation: str,
        tenant_id: str,
        result: dict[str, Any],
        now: datetime,
    ) -> StoredRequest:
        """Stores the first answer; a concurrent twin's answer wins if it was first."""
        try:
            async with transaction(self._engine) as conn:
                await conn.execute(
                    insert(account_requests).values(
                        request_id=request_id,
                        request_fingerprint=request_fingerprint,
                        operation=operation,
                        tenant_id=tenant_id,
                        result=json.dumps(result, sort_keys=True),
                        created_at=now,
                    )
                )
            return StoredRequest(request_fingerprint, result)
        except IntegrityError:
            prior = await self.find_request(request_id)
            if prior is None:
                raise
            return prior

    # The charge outbox

    @storage_faults_unavailable
    async def enqueue_charge(self, charge: Charge) -> Charge:
        """Writes a pending charge; if the tenant has one pending already, returns that one
        (or, for a request_id seen before, the charge it made)."""
        try:
            async with transaction(self._engine) as conn:
                await conn.execute(insert(charges).values(_charge_row(charge)))
            return charge
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
        self, tenant_id: str, charge_id: str, now: datetime, *, at_least_micros: int | None = None
    ) -> bool:
        """Decides and writes a top-up in one statement: only for an active tenant with a card
        in good standing and auto top-up on, only if no charge of the tenant is pending, and
        only if the charge fits whole under the tenant's monthly ceiling.

        at_least_micros None: an automatic top-up, only when available credit is under the
        tenant's threshold. Else an on-demand top-up (a reservation found no room) of the
        tenant's top-up amount or `at_least_micros` if that is more (whole cents).
        """
        amount = self._charge_amount_sql(at_least_micros)
        conditions = (
            *self._top_up_rule(on_demand=at_least_micros is not None),
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
        ).where(tenants.c.tenant_id == tenant_id, *conditions)
        statement = insert(charges).from_select(
            [
                "charge_id",
                "tenant_id",
                "amount_micros",
                "trigger",
                "status",
                "created_at",
                "updated_at",
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
        self, tenant_id: str, now: datetime, *, at_least_micros: int | None = None
    ) -> bool:
        """True if the tenant would get a top-up (as enqueue_automatic decides it) but for the
        monthly ceiling. Only explains a refusal; the decision itself is enqueue_automatic's."""
        amount = self._charge_amount_sql(at_least_micros)
        async with self._engine.connect() as conn:
            found = await conn.execute(
                select(tenants.c.tenant_id).where(
                    tenants.c.tenant_id == tenant_id,
                    *self._top_up_rule(on_demand=at_least_micros is not None),
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
                    *self._top_up_rule(on_demand=False),
                    tenants.c.tenant_id.not_in(pending),
                    self._under_ceiling_sql(amount, now or datetime.now(UTC)),
                )
                .limit(limit)
            )
            return [str(tenant_id) for tenant_id in found.scalars()]

    def _top_up_rule(self, *, on_demand: bool) -> tuple[Any, ...]:
        threshold = _or_default(
            tenants.c.auto_top_up_threshold_micros, self._defaults.threshold_micros
        )
        conditions = _auto_top_up_due(threshold)
        # On demand, a reservation found no room: the threshold does not matter.
        return conditions[:-1] if on_demand else conditions

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
        """A new automatic charge of `amount` fits: what automatic charges took this month
        (since the last manual top-up, if later) plus one in flight plus it, at most the
        ceiling."""
        charged = _automatic_top_ups_sql(month_start(now), since_manual_top_up=True)
        return charged + _pending_automatic_sql() + amount <= self._monthly_limit_sql()

    @storage_faults_unavailable
    async def claim_due(self, now: datetime, lease: timedelta, limit: int) -> list[ClaimedCharge]:
        """Takes pending charges no live worker owns (SKIP LOCKED across replicas)."""
        due = (
            select(charges.c.charge_id)
            .where(
                charges.c.status == ChargeStatus.PENDING,
                or_(charges.c.lease_until.is_(None), charges.c.lease_until <= now),
            )
            .order_by(charges.c.created_at)
            .limit(limit)
        )
        if self._postgres:
            due = due.with_for_update(skip_locked=True)
        claimed: list[ClaimedCharge] = []
        async with transaction(self._engine) as conn:
            for charge_id in list((await conn.execute(due)).scalars()):
                row = (
                    await conn.execute(
                        update(charges)
                        .where(charges.c.charge_id == charge_id)
                        .values(lease_until=now + lease, attempts=charges.c.attempts + 1)
                        .returning(*charges.c)
                    )
                ).one()
                card = (
                    await conn.execute(
                        select(tenants.c.stripe_customer_id, tenants.c.payment_method_id).where(
                            tenants.c.tenant_id == row.tenant_id
                        )
                    )
                ).one()
                claimed.append(
                    ClaimedCharge(
                        _charge_from_row(row), card.stripe_customer_id, card.payment_method_id
                    )
                )
        return claimed

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
            return [_charge_from_row(row) for row in rows]

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
    async def pending_charges_older_than(self, before: datetime, limit: int) -> list[Charge]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(charges)
                .where(charges.c.status == ChargeStatus.PENDING, charges.c.updated_at < before)
                .order_by(charges.c.created_at)
                .limit(limit)
            )
            return [_charge_from_row(row) for row in rows]

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
    ) -> Charge | None:
        """Moves the charge to `status` if its current status allows; on success credits the
        balance once; a failure marks the tenant's billing status unless `card_problem` is
        False. Returns the charge as it is after (None: no such charge)."""
        async with transaction(self._engine) as conn:
            moved = (
                await conn.execute(
                    update(charges)
                    .where(
                        charges.c.charge_id == charge_id,
                        charges.c.status.in_(ALLOWED_BEFORE[status]),
                    )
                    .values(
                        status=status,
                        payment_intent_id=(
                            charges.c.payment_intent_id
                            if payment_intent_id is None
                            else payment_intent_id
                        ),
                        failure_message=None
                        if status is ChargeStatus.SUCCEEDED
                        else failure_message,
                        lease_until=None,
                        updated_at=now,
                    )
                    .returning(*charges.c)
                )
            ).one_or_none()
            if moved is None:
                return await _charge_where(conn, charges.c.charge_id == charge_id)
            charge = _charge_from_row(moved)
            if status is ChargeStatus.SUCCEEDED:
                charge = await _credit_top_up(conn, charge, now)
            elif card_problem and (problem := STATUS_AFTER_CHARGE.get(status)):
                await conn.execute(
                    update(tenants)
                    .where(
                        tenants.c.tenant_id == charge.tenant_id,
                        tenants.c.billing_status != BillingStatus.DISPUTED,
                    )
                    .values(billing_status=problem, updated_at=now)
                )
            return charge

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
            charge = _charge_from_row(row)
            target = (
                charge.amount_micros if reversed_total_micros is None else reversed_total_micros
            )
            target = min(target, charge.amount_micros)
            if target <= charge.refunded_micros:
                return charge
            credited = charge.status in (ChargeStatus.SUCCEEDED, ChargeStatus.REFUNDED)
            if credited:
                await _append_reversal(conn, charge, target - charge.refunded_micros, now)
            # Before its success is recorded, the refund is only remembered: the credit
            # written then takes it back (see _credit_top_up).
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

    @storage_faults_unavailable
    async def set_billing_status(
        self, tenant_id: str, status: BillingStatus, now: datetime
    ) -> None:
        async with transaction(self._engine) as conn:
            await conn.execute(
                update(tenants)
                .where(tenants.c.tenant_id == tenant_id)
                .values(billing_status=status, updated_at=now)
            )

    def _profile(self, row: Any, pending: Charge | None) -> BillingProfile:
        card = None
        if row.payment_method_id is not None:
            card = Card(
                row.payment_method_id, row.card_brand or "", row.card_last4 or "", row.card_saved_at
            )
        auto = AutoTopUp(
            enabled=bool(row.auto_top_up_enabled),
            threshold_micros=_value_or(
                row.auto_top_up_threshold_micros, self._defaults.threshold_micros
            ),
            amount_micros=_value_or(row.auto_top_up_amount_micros, self._defaults.amount_micros),
        )
        limit = row.top_up_monthly_limit_micros
        if limit is None:
            limit = default_monthly_limit(self._defaults.monthly_limit_micros, auto.amount_micros)
        auto = replace(auto, monthly_limit_micros=int(limit))
        return BillingProfile(
            tenant_id=row.tenant_id,
            billing_status=BillingStatus(row.billing_status),
            stripe_customer_id=row.stripe_customer_id,
            card=card,
            auto_top_up=auto,
            pending_charge=pending,
            automatic_top_ups_this_month_micros=int(row.automatic_top_ups_this_month_micros),
        )


async def _credit_top_up(conn: AsyncConnection, charge: Charge, now: datetime) -> Charge:
    account = await _move(conn, charge.tenant_id, charge.amount_micros, 0)
    assert account is not None
    await _append_entry(
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
        .where(tenants.c.tenant_id == charge.tenant_id, tenants.c.billing_status.in_(_PROBLEMS))
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
    account = await _move(conn, charge.tenant_id, -amount_micros, 0)
    assert account is not None
    await _append_entry(
        conn,
        account,
        EntryKind.TOP_UP_REVERSAL,
        now,
        balance_delta=-amount_micros,
        memo=f"card charge {charge.payment_intent_id} refunded or disputed",
        charge_id=charge.charge_id,
    )


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


def _automatic_top_ups_sql(since: datetime, *, since_manual_top_up: bool = False) -> Any:
    """What successful automatic charges credited the tenant (of the enclosing row) since
    `since`: the sum of their TOP_UP ledger entries, read from the ledger, never kept apart.

    Reversals (refunds, disputes) do not give room back: the ceiling bounds what was charged to
    the card without a person asking. since_manual_top_up: only entries after the tenant's last
    successful manual top-up, which is the tenant's yes to more charges.
    """
    counted, charge = ledger_entries.alias("counted"), charges.alias("counted_charge")
    conditions = [
        charge.c.tenant_id == tenants.c.tenant_id,
        charge.c.trigger.in_([str(trigger) for trigger in AUTOMATIC_TRIGGERS]),
        counted.c.kind == EntryKind.TOP_UP,
        counted.c.created_at >= since,
    ]
    if since_manual_top_up:
        manual, manual_charge = ledger_entries.alias("manual"), charges.alias("manual_charge")
        manual_charges = (
            select(manual_charge.c.charge_id)
            .where(
                manual_charge.c.tenant_id == tenants.c.tenant_id,
                manual_charge.c.trigger == ChargeTrigger.MANUAL,
            )
            .correlate(tenants)
        )
        last_manual = (
            select(func.max(manual.c.entry_id))
            .where(manual.c.charge_id.in_(manual_charges), manual.c.kind == EntryKind.TOP_UP)
            .scalar_subquery()
        )
        conditions.append(counted.c.entry_id > func.coalesce(last_manual, 0))
    return (
        select(func.coalesce(func.sum(counted.c.balance_delta_micros), 0))
        .select_from(charge.join(counted, counted.c.charge_id == charge.c.charge_id))
        .where(*conditions)
        .scalar_subquery()
    )


def _pending_automatic_sql() -> Any:
    """An automatic charge in flight counts against the ceiling before it succeeds."""
    pending = charges.alias("pending_charge")
    return (
        select(func.coalesce(func.sum(pending.c.amount_micros), 0))
        .where(
            pending.c.tenant_id == tenants.c.tenant_id,
            pending.c.status == ChargeStatus.PENDING,
            pending.c.trigger.in_([str(trigger) for trigger in AUTOMATIC_TRIGGERS]),
        )
        .scalar_subquery()
    )


def _cleared_status() -> Any:
    return case(
        (tenants.c.billing_status.in_(_PROBLEMS), literal(str(BillingStatus.GOOD_STANDING))),
        else_=tenants.c.billing_status,
    )


def _or_default(column: Any, default: int) -> Any:
    return case((column.is_(None), literal(default, column.type)), else_=column)


def _value_or(value: int | None, default: int) -> int:
    return default if value is None else int(value)


async def _charge_where(conn: AsyncConnection, *conditions: Any) -> Charge | None:
    row = (await conn.execute(select(charges).where(and_(*conditions)))).first()
    return None if row is None else _charge_from_row(row)


def _charge_row(charge: Charge) -> dict[str, Any]:
    return {
        "charge_id": charge.charge_id,
        "tenant_id": charge.tenant_id,
        "amount_micros": charge.amount_micros,
        "trigger": charge.trigger,
        "status": charge.status,
        "request_id": charge.request_id,
        "request_fingerprint": charge.request_fingerprint,
        "payment_intent_id": charge.payment_intent_id,
        "failure_message": charge.failure_message,
        "refunded_micros": charge.refunded_micros,
        "created_at": charge.created_at,
        "updated_at": charge.updated_at,
    }


def _charge_from_row(row: Any) -> Charge:
    return Charge(
        charge_id=row.charge_id,
        tenant_id=row.tenant_id,
        amount_micros=row.amount_micros,
        trigger=ChargeTrigger(row.trigger),
        status=ChargeStatus(row.status),
        payment_intent_id=row.payment_intent_id,
        failure_message=row.failure_message,
        refunded_micros=row.refunded_micros,
        created_at=row.created_at,
        updated_at=row.updated_at,
        request_id=row.request_id,
        request_fingerprint=row.request_fingerprint,
    )
