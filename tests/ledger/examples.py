"""Shared by the property tests that run many examples against one database: a runner that
keeps one event loop and one migrated database for all of them (hypothesis calls tests
synchronously), and a metered hold as the core would build it."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta

from billing_service.domain.model import Hold, HoldStatus
from billing_service.domain.pricing import ModelPrice
from billing_service.storage.database import create_engine
from billing_service.storage.ledger_store import LedgerStore
from billing_service.storage.migrations import migrate


class Runner:
    def __init__(self, url: str, *, pool_size: int = 2, coalesce: bool = False) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(migrate(url))
        self.engine = create_engine(url, pool_size=pool_size)
        self.postgres = self.engine.dialect.name == "postgresql"
        self.store = LedgerStore(self.engine, coalesce=coalesce)

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.dispose())
        self.loop.close()


def metered_hold(
    tenant: str, amount: int, now: datetime, price: ModelPrice, *, api_key_id: str = ""
) -> Hold:
    """A new open hold of `amount` on `price`'s model, by user alice, as ReserveCredit makes it."""
    return Hold(
        hold_id=f"rsv_{uuid.uuid4().hex}",
        request_id=str(uuid.uuid4()),
        request_fingerprint="fp",
        tenant_id=tenant,
        user_id="alice",
        api_key_id=api_key_id,
        model=price.model,
        price=price,
        amount_micros=amount,
        status=HoldStatus.OPEN,
        created_at=now,
        expires_at=now + timedelta(minutes=5),
        decision_available_micros=0,
    )
