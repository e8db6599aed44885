"""The ledger: tenants, holds, ledger entries, usage records, admin requests.

Revision ID: 0001
Revises:
Create Date: 2026-11-24 14:53:10.255305
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "admin_requests",
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("request_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("operation", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("result", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_admin_requests")),
    )
    op.create_table(
        "tenants",
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("credit_limit_micros", sa.BigInteger(), nullable=False),
        sa.Column("payment_method_on_file", sa.Boolean(), nullable=False),
        sa.Column("balance_micros", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("held_micros", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "credit_limit_micros >= 0", name=op.f("ck_tenants_credit_limit_not_negative")
        ),
        sa.CheckConstraint("held_micros >= 0", name=op.f("ck_tenants_held_not_negative")),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_tenants")),
    )
    op.create_table(
        "holds",
        sa.Column("hold_id", sa.String(length=36), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("request_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("billing", sa.String(length=16), nullable=True),
        sa.Column("input_micros_per_mtok", sa.BigInteger(), nullable=False),
        sa.Column("cached_input_micros_per_mtok", sa.BigInteger(), nullable=False),
        sa.Column("output_micros_per_mtok", sa.BigInteger(), nullable=False),
        sa.Column("flat_micros_per_call", sa.BigInteger(), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("denial_reason", sa.String(length=32), nullable=True),
        sa.Column("decision_available_micros", sa.BigInteger(), nullable=False),
        sa.Column("refunded_micros", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("amount_micros >= 0", name=op.f("ck_holds_amount_not_negative")),
        sa.CheckConstraint("refunded_micros >= 0", name=op.f("ck_holds_refunded_not_negative")),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.tenant_id"], name=op.f("fk_holds_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("hold_id", name=op.f("pk_holds")),
        sa.UniqueConstraint("request_id", name=op.f("uq_holds_request_id")),
    )
    op.create_index(
        "ix_holds_open_expires_at",
        "holds",
        ["expires_at"],
        unique=False,
        postgresql_where=sa.text("status = 'open'"),
        sqlite_where=sa.text("status = 'open'"),
    )
    op.create_index(
        "ix_holds_tenant_id_created_at", "holds", ["tenant_id", "created_at"], unique=False
    )

    op.create_table(
        "ledger_entries",
        sa.Column("entry_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("hold_id", sa.String(length=36), nullable=True),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.Column("request_fingerprint", sa.String(length=64), nullable=True),
        sa.Column("balance_delta_micros", sa.BigInteger(), nullable=False),
        sa.Column("held_delta_micros", sa.BigInteger(), nullable=False),
        sa.Column("balance_after_micros", sa.BigInteger(), nullable=False),
        sa.Column("held_after_micros", sa.BigInteger(), nullable=False),
        sa.Column("available_after_micros", sa.BigInteger(), nullable=False),
        sa.Column("memo", sa.String(length=500), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["hold_id"], ["holds.hold_id"], name=op.f("fk_ledger_entries_hold_id_holds")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.tenant_id"], name=op.f("fk_ledger_entries_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("entry_id", name=op.f("pk_ledger_entries")),
        sa.UniqueConstraint("request_id", name=op.f("uq_ledger_entries_request_id")),
    )
    op.create_index("ix_ledger_entries_hold_id", "ledger_entries", ["hold_id"], unique=False)
    op.create_index(
        "ix_ledger_entries_tenant_id_entry_id",
        "ledger_entries",
        ["tenant_id", "entry_id"],
        unique=False,
    )

    op.create_table(
        "usage_records",
        sa.Column("hold_id", sa.String(length=36), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("request_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_micros", sa.BigInteger(), nullable=False),
        sa.Column("charged_micros", sa.BigInteger(), nullable=False),
        sa.Column("uncollected_micros", sa.BigInteger(), nullable=False),
        sa.Column("held_micros", sa.BigInteger(), nullable=False),
        sa.Column("payment_source", sa.String(length=16), nullable=False),
        sa.Column("reserved_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("committed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("available_after_micros", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["hold_id"], ["holds.hold_id"], name=op.f("fk_usage_records_hold_id_holds")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.tenant_id"], name=op.f("fk_usage_records_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("hold_id", name=op.f("pk_usage_records")),
        sa.UniqueConstraint("request_id", name=op.f("uq_usage_records_request_id")),
    )
    op.create_index(
        "ix_usage_records_tenant_id_committed_at",
        "usage_records",
        ["tenant_id", "committed_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_usage_records_tenant_id_committed_at", table_name="usage_records")

    op.drop_table("usage_records")
    op.drop_index("ix_ledger_entries_tenant_id_entry_id", table_name="ledger_entries")
    op.drop_index("ix_ledger_entries_hold_id", table_name="ledger_entries")

    op.drop_table("ledger_entries")
    op.drop_index("ix_holds_tenant_id_created_at", table_name="holds")
    op.drop_index(
        "ix_holds_open_expires_at",
        postgresql_where=sa.text("status = 'open'"),
        sqlite_where=sa.text("status = 'open'"),
        table_name="holds",
    )

    op.drop_table("holds")
    op.drop_table("tenants")
    op.drop_table("admin_requests")
