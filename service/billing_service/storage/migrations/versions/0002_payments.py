"""Payments: Stripe customers, saved cards, billing status, top-up charges (the outbox).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 18:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _tenant_columns() -> tuple[sa.Column[object], ...]:
    return (
        sa.Column(
            "billing_status",
            sa.String(length=24),
            server_default=sa.text("'good_standing'"),
            nullable=False,
        ),
        sa.Column("stripe_customer_id", sa.String(length=64), nullable=True),
        sa.Column("payment_method_id", sa.String(length=64), nullable=True),
        sa.Column("card_brand", sa.String(length=32), nullable=True),
        sa.Column("card_last4", sa.String(length=4), nullable=True),
        sa.Column("card_saved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("auto_top_up_enabled", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("auto_top_up_threshold_micros", sa.BigInteger(), nullable=True),
        sa.Column("auto_top_up_amount_micros", sa.BigInteger(), nullable=True),
    )


def upgrade() -> None:
    for column in _tenant_columns():
        op.add_column("tenants", column)
    op.add_column("ledger_entries", sa.Column("charge_id", sa.String(length=36), nullable=True))
    op.create_index(op.f("ix_ledger_entries_charge_id"), "ledger_entries", ["charge_id"])
    op.create_table(
        "charges",
        sa.Column("charge_id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.Column("request_fingerprint", sa.String(length=64), nullable=True),
        sa.Column("payment_intent_id", sa.String(length=64), nullable=True),
        sa.Column("failure_message", sa.String(length=500), nullable=True),
        sa.Column("refunded_micros", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("amount_micros > 0", name=op.f("ck_charges_amount_positive")),
        sa.CheckConstraint("refunded_micros >= 0", name=op.f("ck_charges_refunded_not_negative")),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.tenant_id"], name=op.f("fk_charges_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("charge_id", name=op.f("pk_charges")),
        sa.UniqueConstraint("request_id", name=op.f("uq_charges_request_id")),
    )
    op.create_index(
        "ix_charges_tenant_id_pending",
        "charges",
        ["tenant_id"],
        unique=True,
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    )
    op.create_index(op.f("ix_charges_payment_intent_id"), "charges", ["payment_intent_id"])
    op.create_index(op.f("ix_charges_status_created_at"), "charges", ["status", "created_at"])
    op.create_table(
        "account_requests",
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("request_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("operation", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("result", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_account_requests")),
    )


def downgrade() -> None:
    op.drop_table("account_requests")
    op.drop_index("ix_charges_status_created_at", table_name="charges")
    op.drop_index("ix_charges_payment_intent_id", table_name="charges")
    op.drop_index("ix_charges_tenant_id_pending", table_name="charges")
    op.drop_table("charges")
    op.drop_index("ix_ledger_entries_charge_id", table_name="ledger_entries")
    with op.batch_alter_table("ledger_entries") as batch:
        batch.drop_column("charge_id")
    with op.batch_alter_table("tenants") as batch:
        for column in reversed(_tenant_columns()):
            batch.drop_column(column.name)
