"""A monthly ceiling on automatic top-ups per tenant.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24 19:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "tenants", sa.Column("top_up_monthly_limit_micros", sa.BigInteger(), nullable=True)
    )
    op.create_index(op.f("ix_charges_tenant_id_created_at"), "charges", ["tenant_id", "created_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_charges_tenant_id_created_at"), table_name="charges")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("top_up_monthly_limit_micros")
