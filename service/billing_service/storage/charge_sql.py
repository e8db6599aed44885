"""The charge rules the database applies, written once as SQL expressions over the charges and
tenants tables, and the charge row <-> domain.payments.Charge mapping.

- The monthly ceiling counts every automatic charge that took money or may still
  (domain.payments.MAY_TAKE_MONEY), in the month it was made.
- A charge's outcome moves the tenant's billing status only when it is the tenant's latest
  charge (creation order) and, for a payment problem, was made with the card on file.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, func, literal, or_, select
from sqlalchemy.sql import ColumnElement

from billing_service.domain.ledger import EntryKind
from billing_service.domain.payments import (
    AUTOMATIC_TRIGGERS,
    BillingStatus,
    Charge,
    ChargeStatus,
    ChargeTrigger,
)
from billing_service.storage.tables import charges, ledger_entries, tenants

PROBLEMS = (BillingStatus.PAYMENT_FAILED, BillingStatus.ACTION_REQUIRED)


def automatic_charges_sql(
    since: datetime, statuses: Iterable[ChargeStatus], *, since_manual_top_up: bool = False
) -> Any:
    """The sum of the amounts of the automatic charges of the tenant (of the enclosing row)
    made since `since` whose status is one of `statuses`.

    Refunds and disputes give no room back: the ceiling bounds what was charged to the card
    without a person asking. since_manual_top_up: only charges made after the tenant's last
    successful manual top-up was credited, which is the tenant's yes to more charges.
    """
    counted = charges.alias("counted_charge")
    conditions: list[Any] = [
        counted.c.tenant_id == tenants.c.tenant_id,
        counted.c.trigger.in_([str(trigger) for trigger in AUTOMATIC_TRIGGERS]),
        counted.c.status.in_([str(status) for status in statuses]),
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
            select(func.max(manual.c.created_at))
            .where(manual.c.charge_id.in_(manual_charges), manual.c.kind == EntryKind.TOP_UP)
            .scalar_subquery()
        )
        conditions.append(or_(last_manual.is_(None), counted.c.created_at > last_manual))
    return (
        select(func.coalesce(func.sum(counted.c.amount_micros), 0))
        .where(*conditions)
        .correlate(tenants)
        .scalar_subquery()
    )


def newer_charge_exists(charge: Charge) -> ColumnElement[bool]:
    """A charge of the same tenant made after `charge` (creation time, then id)."""
    other = charges.alias("newer_charge")
    return (
        select(literal(1))
        .where(
            other.c.tenant_id == charge.tenant_id,
            or_(
                other.c.created_at > charge.created_at,
                and_(other.c.created_at == charge.created_at, other.c.charge_id > charge.charge_id),
            ),
        )
        .exists()
    )


def decides_billing_status(charge: Charge, *, problem: bool) -> tuple[ColumnElement[bool], ...]:
    """Conditions on the tenant row under which `charge`'s outcome sets its billing status: it
    is the latest charge, and a problem (declined, authentication) only with the card on file.
    A dispute is only ever cleared by an operator."""
    conditions: list[ColumnElement[bool]] = [
        tenants.c.tenant_id == charge.tenant_id,
        tenants.c.billing_status != BillingStatus.DISPUTED,
        ~newer_charge_exists(charge),
    ]
    if problem:
        conditions.append(tenants.c.payment_method_id == charge.payment_method_id)
    else:
        conditions.append(tenants.c.billing_status.in_(PROBLEMS))
    return tuple(conditions)


def cleared_status() -> Any:
    """A new card (or no card) clears a payment problem; a dispute stays."""
    return case(
        (tenants.c.billing_status.in_(PROBLEMS), literal(str(BillingStatus.GOOD_STANDING))),
        else_=tenants.c.billing_status,
    )


def charge_row(charge: Charge) -> dict[str, Any]:
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
        "stripe_customer_id": charge.stripe_customer_id,
        "payment_method_id": charge.payment_method_id,
        "currency": charge.currency,
        "sent_at": charge.sent_at,
    }


def charge_from_row(row: Any) -> Charge:
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
        stripe_customer_id=row.stripe_customer_id,
        payment_method_id=row.payment_method_id,
        currency=row.currency,
        sent_at=row.sent_at,
        attempts=row.attempts,
    )
