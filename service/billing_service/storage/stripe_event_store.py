"""Which Stripe webhook events have been applied, so a redelivery is not applied again."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_service.storage.database import storage_faults_unavailable, transaction
from billing_service.storage.tables import stripe_events


class StripeEventStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @storage_faults_unavailable
    async def is_processed(self, event_id: str) -> bool:
        async with self._engine.connect() as conn:
            found = await conn.scalar(
                select(stripe_events.c.event_id).where(stripe_events.c.event_id == event_id)
            )
        return found is not None

    @storage_faults_unavailable
    async def record_processed(
        self,
        *,
        event_id: str,
        event_type: str,
        created: datetime,
        received_at: datetime,
        processed_at: datetime,
    ) -> None:
        """Records an applied event; a second record of the same event keeps the first."""
        async with transaction(self._engine) as conn:
            dialect_insert = (
                postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
            )
            await conn.execute(
                dialect_insert(stripe_events)
                .values(
                    event_id=event_id,
                    type=event_type,
                    created=created,
                    received_at=received_at,
                    processed_at=processed_at,
                )
                .on_conflict_do_nothing()
            )
