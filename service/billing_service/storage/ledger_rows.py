"""Rows of the ledger's tables <-> domain objects: accounts (tenants), holds and usage records,
and the JSON an admin request stores its account as."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime
from typing import Any

from sqlalchemy import Row

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
from billing_service.domain.payments import BillingStatus
from billing_service.domain.pricing import ModelBilling, ModelPrice, TokenUsage
from billing_service.storage import budget_store
from billing_service.storage.tables import tenants

ACCOUNT_COLUMNS = (
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


def account_from_row(row: Any) -> Account:
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


def account_row(account: Account) -> dict[str, Any]:
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


def account_to_json(account: Account) -> str:
    body = asdict(account)
    for key in ("created_at", "updated_at"):
        value = body[key]
        body[key] = None if value is None else value.isoformat()
    return json.dumps(body, sort_keys=True)


def account_from_json(text: str) -> Account:
    body = json.loads(text)
    for key in ("created_at", "updated_at"):
        value = body[key]
        body[key] = None if value is None else datetime.fromisoformat(value)
    body["status"] = TenantStatus(body["status"])
    body["billing_status"] = BillingStatus(body.get("billing_status", "good_standing"))
    return Account(**body)


def balance_after(entry: Any) -> Balance:
    effective_limit = (
        entry.available_after_micros - entry.balance_after_micros + entry.held_after_micros
    )
    return Balance(entry.balance_after_micros, entry.held_after_micros, effective_limit)


def hold_row(hold: Hold) -> dict[str, Any]:
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


def hold_from_row(row: Any) -> Hold:
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


def usage_row(record: UsageRecord) -> dict[str, Any]:
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


def usage_from_row(row: Any) -> UsageRecord:
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
