"""The keys the migrations stored for every replica to share (table signing_keys)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_service.domain.errors import ErrorReason, Unavailable
from billing_service.storage.tables import signing_keys

PAGE_TOKENS = "page_tokens"


async def stored_key(engine: AsyncEngine, purpose: str) -> bytes:
    """The key for `purpose`; Unavailable while the database is down or not yet migrated."""
    try:
        async with engine.connect() as conn:
            key_hex = (
                await conn.execute(
                    select(signing_keys.c.key_hex).where(signing_keys.c.purpose == purpose)
                )
            ).scalar_one_or_none()
    except (SQLAlchemyError, OSError) as error:
        raise Unavailable(
            ErrorReason.STORAGE_UNAVAILABLE, "the billing database is unavailable"
        ) from error
    if key_hex is None:
        raise Unavailable(
            ErrorReason.STORAGE_UNAVAILABLE,
            f"the billing database has no {purpose} key: run the migrations",
        )
    return bytes.fromhex(key_hex)
