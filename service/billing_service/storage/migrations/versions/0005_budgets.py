"""Budgets inside a tenant: per user and per API key limits with their spend per period.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 19:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN (a default, or nullable): SQLite adds it in place, without copying holds,
    # which other tables reference.
    op.add_column(
        "holds",
        sa.Column(
            "api_key_id", sa.String(length=128), server_default=sa.text("''"), nullable=False
        ),
    )
    op.add_column("holds", sa.Column("budgets", sa.Text(), nullable=True))
    op.create_table(
        "budgets",
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("scope_id", sa.String(length=128), nullable=False),
        sa.Column("limit_micros", sa.BigInteger(), nullable=False),
        sa.Column("period", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.tenant_id"], name=op.f("fk_budgets_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("tenant_id", "scope", "scope_id", name=op.f("pk_budgets")),
    )
    op.create_table(
        "budget_periods",
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("scope_id", sa.String(length=128), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("spent_micros", sa.BigInteger(), nullable=False),
        sa.Column("held_micros", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.tenant_id"], name=op.f("fk_budget_periods_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint(
            "tenant_id", "scope", "scope_id", "period_start", name=op.f("pk_budget_periods")
        ),
    )
    op.create_table(
        "budget_requests",
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("request_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("result", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_budget_requests")),
    )


def downgrade() -> None:
    op.drop_table("budget_requests")
    op.drop_table("budget_periods")
    op.drop_table("budgets")
    with op.batch_alter_table("holds") as batch:
        batch.drop_column("budgets")
        batch.drop_column("api_key_id")
