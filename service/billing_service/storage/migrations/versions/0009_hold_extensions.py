"""Holds that grow: what extensions added to a hold, and every ExtendHold answer.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN (a default, or nullable): SQLite adds it in place, without copying holds,
    # which other tables reference.
    op.add_column(
        "holds",
        sa.Column("extended_micros", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column(
        "holds", sa.Column("granted_expires_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_table(
        "hold_extensions",
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("request_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("hold_id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("required_micros", sa.BigInteger(), nullable=False),
        sa.Column("denial_reason", sa.String(length=32), nullable=True),
        sa.Column("amount_after_micros", sa.BigInteger(), nullable=False),
        sa.Column("expires_at_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decision_available_micros", sa.BigInteger(), nullable=False),
        sa.Column("budgets", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["hold_id"], ["holds.hold_id"], name=op.f("fk_hold_extensions_hold_id_holds")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.tenant_id"], name=op.f("fk_hold_extensions_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_hold_extensions")),
    )
    op.create_index(op.f("ix_hold_extensions_hold_id"), "hold_extensions", ["hold_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_hold_extensions_hold_id"), table_name="hold_extensions")
    op.drop_table("hold_extensions")
    with op.batch_alter_table("holds") as batch:
        batch.drop_column("granted_expires_at")
        batch.drop_column("extended_micros")
