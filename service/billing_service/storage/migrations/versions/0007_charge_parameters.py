"""Charges keep what they ask Stripe and who owns them; SetupIntents we created, in order.

A charge's customer, payment method and currency are fixed when it is decided, so a retry
sends exactly the first request; `sent_at` says it may have reached Stripe; `claim_token`
fences a worker whose lease was taken over. The setup_intents table and tenants.card_fact_at
order card facts by our own data, so a late Stripe event about an older card changes nothing.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CHARGE_COLUMNS = (
    ("stripe_customer_id", sa.String(length=64)),
    ("payment_method_id", sa.String(length=64)),
    ("currency", sa.String(length=3)),
    ("sent_at", sa.DateTime(timezone=True)),
    ("claim_token", sa.String(length=32)),
)


def upgrade() -> None:
    # Plain nullable ADD COLUMNs: SQLite adds them in place.
    for name, type_ in _CHARGE_COLUMNS:
        op.add_column("charges", sa.Column(name, type_, nullable=True))
    op.add_column("tenants", sa.Column("card_fact_at", sa.DateTime(timezone=True), nullable=True))
    # A charge still pending was sent (if at all) with the tenant's card of the time, which is
    # the card on file unless it changed since; one that was claimed before may have reached
    # Stripe at any time since it was decided.
    op.execute(
        """
        UPDATE charges SET
            stripe_customer_id = (
                SELECT tenants.stripe_customer_id FROM tenants
                WHERE tenants.tenant_id = charges.tenant_id),
            payment_method_id = (
                SELECT tenants.payment_method_id FROM tenants
                WHERE tenants.tenant_id = charges.tenant_id),
            sent_at = CASE WHEN attempts > 0 THEN created_at END
        WHERE status = 'pending'
        """
    )
    op.create_table(
        "setup_intents",
        sa.Column("setup_intent_id", sa.String(length=255), nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.tenant_id"], name=op.f("fk_setup_intents_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("setup_intent_id", name=op.f("pk_setup_intents")),
    )
    op.create_index(op.f("ix_charges_status_lease_until"), "charges", ["status", "lease_until"])


def downgrade() -> None:
    op.drop_index(op.f("ix_charges_status_lease_until"), table_name="charges")
    op.drop_table("setup_intents")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("card_fact_at")
    with op.batch_alter_table("charges") as batch:
        for name, _ in reversed(_CHARGE_COLUMNS):
            batch.drop_column(name)
