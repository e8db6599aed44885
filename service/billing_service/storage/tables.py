"""The schema. Money columns are BIGINT micros; times are UTC.

Invariants the ledger keeps (checked by tests after every step):
  tenants.balance_micros = sum(ledger_entries.balance_delta_micros) per tenant
  tenants.held_micros    = sum(ledger_entries.held_delta_micros) per tenant
                         = sum(holds.amount_micros) over the tenant's open metered holds
  holds.amount_micros    = its "hold" entry + its "extension" entries while it is open
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
    true,
)
from sqlalchemy.types import TypeDecorator

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite has no time zones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _micros(name: str, **kwargs: Any) -> Column[int]:
    return Column(name, BigInteger, nullable=False, **kwargs)


tenants = Table(
    "tenants",
    metadata,
    Column("tenant_id", String(128), primary_key=True),
    Column("status", String(16), nullable=False),
    _micros("credit_limit_micros"),
    Column("payment_method_on_file", Boolean, nullable=False),
    _micros("balance_micros", server_default=text("0")),
    _micros("held_micros", server_default=text("0")),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    # Payments (migration 0002). A NULL top-up threshold or amount means the server's default.
    Column("billing_status", String(24), nullable=False, server_default=text("'good_standing'")),
    Column("stripe_customer_id", String(64), nullable=True),
    Column("payment_method_id", String(64), nullable=True),
    Column("card_brand", String(32), nullable=True),
    Column("card_last4", String(4), nullable=True),
    Column("card_saved_at", UtcDateTime, nullable=True),
    Column("auto_top_up_enabled", Boolean, nullable=False, server_default=true()),
    Column("auto_top_up_threshold_micros", BigInteger, nullable=True),
    Column("auto_top_up_amount_micros", BigInteger, nullable=True),
    # The most automatic top-ups may charge per calendar month (migration 0006); NULL: default.
    Column("top_up_monthly_limit_micros", BigInteger, nullable=True),
    # When the newest fact about the tenant's card happened, by our own data (migration 0007):
    # the creation of the SetupIntent that saved the card on file, or the card's removal. A
    # SetupIntent created before it is older news and never replaces the card.
    Column("card_fact_at", UtcDateTime, nullable=True),
    CheckConstraint("held_micros >= 0", name="held_not_negative"),
    CheckConstraint("credit_limit_micros >= 0", name="credit_limit_not_negative"),
)

holds = Table(
    "holds",
    metadata,
    Column("hold_id", String(36), primary_key=True),
    Column("request_id", String(128), nullable=False, unique=True),
    Column("request_fingerprint", String(64), nullable=False),
    Column("tenant_id", String(128), ForeignKey("tenants.tenant_id"), nullable=False),
    Column("user_id", String(128), nullable=False),
    Column("model", String(128), nullable=False),
    # The model's billing and prices when the hold was taken (NULL billing: model not offered).
    Column("billing", String(16), nullable=True),
    _micros("input_micros_per_mtok"),
    _micros("cached_input_micros_per_mtok"),
    _micros("output_micros_per_mtok"),
    _micros("flat_micros_per_call"),
    _micros("amount_micros"),
    Column("status", String(16), nullable=False),
    Column("denial_reason", String(32), nullable=True),
    _micros("decision_available_micros"),
    _micros("refunded_micros", server_default=text("0")),
    Column("created_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
    Column("settled_at", UtcDateTime, nullable=True),
    # The API key or caller label of the call ("" when none was given).
    Column("api_key_id", String(128), nullable=False, server_default=text("''")),
    # The budgets that applied, as of the decision, as JSON (storage.budget_store); NULL when
    # none applied. A granted hold's commit, release or expiry moves the periods named there.
    Column("budgets", Text, nullable=True),
    # What granted extensions (ExtendHold) added to the amount (migration 0009); amount_micros
    # includes it, so the hold as granted is amount_micros - extended_micros.
    _micros("extended_micros", server_default=text("0")),
    # The expire time as granted, once an extension moved it; NULL while it never moved.
    Column("granted_expires_at", UtcDateTime, nullable=True),
    CheckConstraint("amount_micros >= 0", name="amount_not_negative"),
    CheckConstraint("refunded_micros >= 0", name="refunded_not_negative"),
)
Index(
    "ix_holds_open_expires_at",
    holds.c.expires_at,
    postgresql_where=holds.c.status == "open",
    sqlite_where=holds.c.status == "open",
)
Index("ix_holds_tenant_id_created_at", holds.c.tenant_id, holds.c.created_at)

ledger_entries = Table(
    "ledger_entries",
    metadata,
    Column("entry_id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("tenant_id", String(128), ForeignKey("tenants.tenant_id"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("hold_id", String(36), ForeignKey("holds.hold_id"), nullable=True),
    # Set on entries made by a Refund or a GrantCredit: the idempotency key of that call.
    Column("request_id", String(128), nullable=True, unique=True),
    Column("request_fingerprint", String(64), nullable=True),
    _micros("balance_delta_micros"),
    _micros("held_delta_micros"),
    # The tenant's state right after this entry, so a statement can be read without replaying.
    _micros("balance_after_micros"),
    _micros("held_after_micros"),
    _micros("available_after_micros"),
    Column("memo", String(500), nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    # The card charge a TOP_UP or TOP_UP_REVERSAL entry records (migration 0002).
    Column("charge_id", String(36), nullable=True),
)
Index("ix_ledger_entries_charge_id", ledger_entries.c.charge_id)
Index("ix_ledger_entries_tenant_id_entry_id", ledger_entries.c.tenant_id, ledger_entries.c.entry_id)
Index("ix_ledger_entries_hold_id", ledger_entries.c.hold_id)

# ExtendHold answers, granted or denied, kept so that a retry replays the first one
# (migration 0009). A granted extension is also a ledger entry of kind "extension".
hold_extensions = Table(
    "hold_extensions",
    metadata,
    Column("request_id", String(128), primary_key=True),
    Column("request_fingerprint", String(64), nullable=False),
    Column("hold_id", String(36), ForeignKey("holds.hold_id"), nullable=False),
    Column("tenant_id", String(128), ForeignKey("tenants.tenant_id"), nullable=False),
    # The extension's price; added to the hold when granted.
    _micros("required_micros"),
    # NULL when granted.
    Column("denial_reason", String(32), nullable=True),
    # The hold's amount and expire time right after the decision.
    _micros("amount_after_micros"),
    Column("expires_at_after", UtcDateTime, nullable=False),
    _micros("decision_available_micros"),
    # The budgets the hold took from, as of the decision, as JSON (storage.budget_store).
    Column("budgets", Text, nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
)
Index("ix_hold_extensions_hold_id", hold_extensions.c.hold_id)

usage_records = Table(
    "usage_records",
    metadata,
    Column("hold_id", String(36), ForeignKey("holds.hold_id"), primary_key=True),
    Column("request_id", String(128), nullable=False, unique=True),
    Column("request_fingerprint", String(64), nullable=False),
    Column("tenant_id", String(128), ForeignKey("tenants.tenant_id"), nullable=False),
    Column("user_id", String(128), nullable=False),
    Column("model", String(128), nullable=False),
    Column("input_tokens", BigInteger, nullable=False),
    Column("cached_input_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    _micros("cost_micros"),
    _micros("charged_micros"),
    _micros("uncollected_micros"),
    _micros("held_micros"),
    Column("payment_source", String(16), nullable=False),
    Column("reserved_at", UtcDateTime, nullable=False),
    Column("committed_at", UtcDateTime, nullable=False),
    Column("available_after_micros", BigInteger, nullable=False),
)
# The usage index (tenant_id, committed_at, hold_id) is declared with the rollups below.

# Operator requests (create/update tenant), kept for idempotent replay and as an audit trail.
admin_requests = Table(
    "admin_requests",
    metadata,
    Column("request_id", String(128), primary_key=True),
    Column("request_fingerprint", String(64), nullable=False),
    Column("operation", String(32), nullable=False),
    Column("tenant_id", String(128), nullable=False),
    Column("result", Text, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)

# Stripe webhook events already applied: a redelivery of one of them is acknowledged unapplied.
stripe_events = Table(
    "stripe_events",
    metadata,
    Column("event_id", String(255), primary_key=True),
    Column("type", String(128), nullable=False),
    # When Stripe created the event (its `created`), when it reached us, when it was applied.
    Column("created", UtcDateTime, nullable=False),
    Column("received_at", UtcDateTime, nullable=False),
    Column("processed_at", UtcDateTime, nullable=False),
)

# Card charges: the transactional outbox of top-ups. A row is written in the transaction that
# decides the charge; the outbox worker then calls Stripe with an idempotency key made from
# charge_id, so a crash and a retry can never charge twice.
charges = Table(
    "charges",
    metadata,
    Column("charge_id", String(36), primary_key=True),
    Column("tenant_id", String(128), ForeignKey("tenants.tenant_id"), nullable=False),
    _micros("amount_micros"),
    Column("trigger", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    # Set for a TopUpNow: its idempotency key.
    Column("request_id", String(128), nullable=True, unique=True),
    Column("request_fingerprint", String(64), nullable=True),
    Column("payment_intent_id", String(64), nullable=True),
    Column("failure_message", String(500), nullable=True),
    _micros("refunded_micros", server_default=text("0")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    # A worker that claimed the pending charge owns it until then (then another may retry it);
    # after an attempt without an outcome, the next attempt is not due before it.
    Column("lease_until", UtcDateTime, nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    # What Stripe is asked, fixed when the charge is decided (migration 0007): every attempt
    # sends exactly these. A NULL currency (older rows) means the server's.
    Column("stripe_customer_id", String(64), nullable=True),
    Column("payment_method_id", String(64), nullable=True),
    Column("currency", String(3), nullable=True),
    # When a request for the charge may first have reached Stripe; NULL: never sent.
    Column("sent_at", UtcDateTime, nullable=True),
    # The claim of the worker that owns the lease: a worker whose lease was taken over can
    # neither send nor reschedule the charge.
    Column("claim_token", String(32), nullable=True),
    CheckConstraint("amount_micros > 0", name="amount_positive"),
    CheckConstraint("refunded_micros >= 0", name="refunded_not_negative"),
)
# At most one charge in flight per tenant.
Index(
    "ix_charges_tenant_id_pending",
    charges.c.tenant_id,
    unique=True,
    postgresql_where=charges.c.status == "pending",
    sqlite_where=charges.c.status == "pending",
)
Index("ix_charges_payment_intent_id", charges.c.payment_intent_id)
Index("ix_charges_status_created_at", charges.c.status, charges.c.created_at)
# The monthly ceiling sums a tenant's charges (migration 0006).
Index("ix_charges_tenant_id_created_at", charges.c.tenant_id, charges.c.created_at)
# Due charges, in the order their attempts fall due (migration 0007).
Index("ix_charges_status_lease_until", charges.c.status, charges.c.lease_until)

# The SetupIntents this service created (CreateSetupIntent), so that a late
# setup_intent.succeeded is ordered by when we started it, not by when Stripe delivered it.
setup_intents = Table(
    "setup_intents",
    metadata,
    Column("setup_intent_id", String(255), primary_key=True),
    Column("tenant_id", String(128), ForeignKey("tenants.tenant_id"), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)

# AccountService requests, kept for idempotent replay (AIP-155).
account_requests = Table(
    "account_requests",
    metadata,
    Column("request_id", String(128), primary_key=True),
    Column("request_fingerprint", String(64), nullable=False),
    Column("operation", String(32), nullable=False),
    Column("tenant_id", String(128), nullable=False),
    Column("result", Text, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)

# Usage per tenant, UTC day, model and end user, kept in the commit's transaction (and in the
# PostgreSQL commit statement): a dashboard summary reads days x models x users rows, never the
# usage records, so its cost does not grow with a tenant's history. Each column is the sum of
# the usage_records column of the same name (charged before any refund).
usage_rollups = Table(
    "usage_rollups",
    metadata,
    Column("tenant_id", String(128), ForeignKey("tenants.tenant_id"), primary_key=True),
    Column("day", Date, primary_key=True),
    Column("model", String(128), primary_key=True),
    Column("user_id", String(128), primary_key=True),
    Column("call_count", BigInteger, nullable=False),
    Column("input_tokens", BigInteger, nullable=False),
    Column("cached_input_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    _micros("cost_micros"),
    _micros("charged_micros"),
)
# Keyset pagination of a tenant's usage records, newest or oldest first.
Index(
    "ix_usage_records_tenant_id_committed_at_hold_id",
    usage_records.c.tenant_id,
    usage_records.c.committed_at,
    usage_records.c.hold_id,
)

# Budgets inside a tenant (domain.budgets): one limit per user or API key.
budgets = Table(
    "budgets",
    metadata,
    Column("tenant_id", String(128), ForeignKey("tenants.tenant_id"), primary_key=True),
    Column("scope", String(16), primary_key=True),
    Column("scope_id", String(128), primary_key=True),
    _micros("limit_micros"),
    Column("period", String(16), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)
# What each budget's holds took in one period, created on first use. No foreign key to budgets:
# a removed budget's open holds still settle here, and a budget set again finds its period's use.
#   spent_micros = sum of the charges (less refunds) of the holds that took from this period
#   held_micros  = sum of the amounts of those holds still open
budget_periods = Table(
    "budget_periods",
    metadata,
    Column("tenant_id", String(128), ForeignKey("tenants.tenant_id"), primary_key=True),
    Column("scope", String(16), primary_key=True),
    Column("scope_id", String(128), primary_key=True),
    Column("period_start", UtcDateTime, primary_key=True),
    _micros("spent_micros"),
    _micros("held_micros"),
)
# SetBudget / DeleteBudget replays: the request and the budget use it answered with.
budget_requests = Table(
    "budget_requests",
    metadata,
    Column("request_id", String(128), primary_key=True),
    Column("request_fingerprint", String(64), nullable=False),
    Column("result", Text, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)
# Keys every replica shares, made once by the migrations (e.g. the page-token key): a secret
# that needs no configuration yet is the same on every replica of one database.
signing_keys = Table(
    "signing_keys",
    metadata,
    Column("purpose", String(64), primary_key=True),
    Column("key_hex", String(128), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)
