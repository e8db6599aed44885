"""Payments in SQL: Stripe customers, saved cards, billing status, idempotent AccountService
requests, and (storage.charge_store) the charge outbox.

Each public method is one short transaction. Card facts are ordered by our own data: a card
saved from an older SetupIntent than the newest card fact (tenants.card_fact_at) is not saved
when the caller asks only for newer news.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, case, insert, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from billing_service.domain.model import Account
from billing_service.domain.payments import (
    TOOK_MONEY,
    AutoTopUp,
    BillingProfile,
    BillingStatus,
    Card,
    Charge,
    ChargeStatus,
    default_monthly_limit,
    month_start,
)
from billing_service.storage.charge_sql import (
    automatic_charges_sql,
    charge_from_row,
    cleared_status,
)
from billing_service.storage.charge_store import ChargeOutbox
from billing_service.storage.database import storage_faults_unavailable, transaction
from billing_service.storage.ledger_rows import ACCOUNT_COLUMNS, account_from_row
from billing_service.storage.tables import account_requests, charges, setup_intents, tenants


@dataclass(frozen=True, slots=True)
class StoredRequest:
    request_fingerprint: str
    result: dict[str, Any]


class PaymentsStore(ChargeOutbox):
    """Everything payments keep: the charge outbox (ChargeOutbox) and the rest, here."""

    # Profiles and cards

    @storage_faults_unavailable
    async def get_profile(
        self, tenant_id: str, now: datetime | None = None
    ) -> BillingProfile | None:
        charged = automatic_charges_sql(month_start(now or datetime.now(UTC)), TOOK_MONEY)
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
        return self._profile(row, None if pending is None else charge_from_row(pending))

    @storage_faults_unavailable
    async def get_account(self, tenant_id: str) -> Account | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(select(*ACCOUNT_COLUMNS).where(tenants.c.tenant_id == tenant_id))
            ).one_or_none()
        return None if row is None else account_from_row(row)

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
    async def save_card(
        self,
        tenant_id: str,
        card: Card,
        now: datetime,
        *,
        fact_at: datetime | None = None,
        only_if_newer: bool = False,
    ) -> bool:
        """The card becomes the tenant's card on file; a payment problem is cleared.

        `fact_at`: when the SetupIntent that saved it was created (default now), which orders
        card facts. only_if_newer: only if that is after the newest card fact (a late event
        about an older card changes nothing). True if the card was saved."""
        fact_at = fact_at or now
        condition: list[Any] = [tenants.c.tenant_id == tenant_id]
        if only_if_newer:
            condition.append(
                or_(tenants.c.card_fact_at.is_(None), tenants.c.card_fact_at < fact_at)
            )
        newest = case(
            (
                and_(tenants.c.card_fact_at.is_not(None), tenants.c.card_fact_at > fact_at),
                tenants.c.card_fact_at,
            ),
            else_=literal(fact_at, tenants.c.card_fact_at.type),
        )
        async with transaction(self._engine) as conn:
            result = await conn.execute(
                update(tenants)
                .where(*condition)
                .values(
                    payment_method_id=card.payment_method_id,
                    card_brand=card.brand,
                    card_last4=card.last4,
                    card_saved_at=card.saved_at or now,
                    payment_method_on_file=True,
                    billing_status=cleared_status(),
                    card_fact_at=newest,
                    updated_at=now,
                )
            )
        return bool(result.rowcount)

    @storage_faults_unavailable
    async def forget_card(
        self, tenant_id: str, payment_method_id: str | None, now: datetime
    ) -> bool:
        """Forgets the card (only `payment_method_id` when given); True if one was forgotten.

        A payment problem was a fact about that card: without a card there is none (a
        dispute stays). The removal is the newest card fact."""
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
                    billing_status=cleared_status(),
                    card_fact_at=now,
                    updated_at=now,
                )
            )
        return bool(result.rowcount)

    @storage_faults_unavailable
    async def record_setup_intent(
        self, setup_intent_id: str, tenant_id: str, now: datetime
    ) -> None:
        """Remembers when we created a SetupIntent (the first time, if told twice)."""
        async with transaction(self._engine) as conn:
            dialect_insert = postgresql.insert if self._postgres else sqlite.insert
            await conn.execute(
                dialect_insert(setup_intents)
                .values(setup_intent_id=setup_intent_id, tenant_id=tenant_id, created_at=now)
                .on_conflict_do_nothing()
            )

    @storage_faults_unavailable
    async def setup_intent_created(self, setup_intent_id: str) -> tuple[str, datetime] | None:
        """(tenant, creation time) of a SetupIntent we created; None for any other."""
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(setup_intents.c.tenant_id, setup_intents.c.created_at).where(
                        setup_intents.c.setup_intent_id == setup_intent_id
                    )
                )
            ).one_or_none()
        return None if row is None else (str(row.tenant_id), row.created_at)

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
        query = select(*ACCOUNT_COLUMNS).where(tenants.c.tenant_id > after_tenant_id)
        if billing_status is not None:
            query = query.where(tenants.c.billing_status == billing_status)
        async with self._engine.connect() as conn:
            rows = await conn.execute(query.order_by(tenants.c.tenant_id).limit(limit))
            return [account_from_row(row) for row in rows]

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
            card_fact_at=row.card_fact_at,
        )


def _value_or(value: int | None, default: int) -> int:
    return default if value is None else int(value)
