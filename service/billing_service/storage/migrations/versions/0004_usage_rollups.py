"""Usage rollups per tenant, UTC day, model and user, for dashboard summaries.

Existing usage records are summed into the rollups, so summaries of past periods are complete.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 18:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_DAY = {
    "postgresql": "(committed_at AT TIME ZONE 'UTC')::date",
    "sqlite": "date(committed_at)",
}


def upgrade() -> None:
    op.create_table(
        "usage_rollups",
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("call_count", sa.BigInteger(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_micros", sa.BigInteger(), nullable=False),
        sa.Column("charged_micros", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.tenant_id"], name=op.f("fk_usage_rollups_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint(
            "tenant_id", "day", "model", "user_id", name=op.f("pk_usage_rollups")
        ),
    )
    day = _DAY[op.get_bind().dialect.name]
    op.execute(
        f"""
        INSERT INTO usage_rollups (
            tenant_id, day, model, user_id, call_count, input_tokens, cached_input_tokens,
            output_tokens, cost_micros, charged_micros
        )
        SELECT tenant_id, {day}, model, user_id, count(*), sum(input_tokens),
            sum(cached_input_tokens), sum(output_tokens), sum(cost_micros), sum(charged_micros)
        FROM usage_records
        GROUP BY tenant_id, {day}, model, user_id
        """
    )
    op.drop_index("ix_usage_records_tenant_id_committed_at", table_name="usage_records")
    op.create_index(
        "ix_usage_records_tenant_id_committed_at_hold_id",
        "usage_records",
        ["tenant_id", "committed_at", "hold_id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_usage_records_tenant_id_committed_at_hold_id", table_name="usage_records")
    op.create_index(
        "ix_usage_records_tenant_id_committed_at",
        "usage_records",
        ["tenant_id", "committed_at"],
        unique=False,
    )
    op.drop_table("usage_rollups")
