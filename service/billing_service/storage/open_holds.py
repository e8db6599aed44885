"""Reading a tenant's open holds for operators: read-only, oldest first, keyset-paginated."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_service.domain.model import HoldStatus
from billing_service.storage.database import storage_faults_unavailable
from billing_service.storage.tables import holds


@dataclass(frozen=True)
class OpenHold:
    hold_id: str
    user_id: str
    api_key_id: str
    model: str
    amount_micros: int
    created_at: datetime
    expires_at: datetime


class OpenHoldStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @storage_faults_unavailable
    async def list_open_holds(
        self,
        tenant_id: str,
        user_id: str | None,
        api_key_id: str | None,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[OpenHold]:
        """The tenant's open holds in (creation time, id) order after `after`."""
        query = select(
            holds.c.hold_id,
            holds.c.user_id,
            holds.c.api_key_id,
            holds.c.model,
            holds.c.amount_micros,
            holds.c.created_at,
            holds.c.expires_at,
        ).where(holds.c.tenant_id == tenant_id, holds.c.status == HoldStatus.OPEN.value)
        if user_id is not None:
            query = query.where(holds.c.user_id == user_id)
        if api_key_id is not None:
            query = query.where(holds.c.api_key_id == api_key_id)
        if after is not None:
            created_at, hold_id = after
            query = query.where(
                or_(
                    holds.c.created_at > created_at,
                    and_(holds.c.created_at == created_at, holds.c.hold_id > hold_id),
                )
            )
        query = query.order_by(holds.c.created_at, holds.c.hold_id).limit(limit)
        async with self._engine.connect() as conn:
            rows = await conn.execute(query)
            return [
                OpenHold(
                    hold_id=row.hold_id,
                    user_id=row.user_id,
                    api_key_id=row.api_key_id,
                    model=row.model,
                    amount_micros=row.amount_micros,
                    created_at=row.created_at,
                    expires_at=row.expires_at,
                )
                for row in rows
            ]
