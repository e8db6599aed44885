"""Alembic environment: online migrations over the service's own async engine."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from billing_service.storage.database import create_engine
from billing_service.storage.tables import metadata

# Serializes concurrent `migrate` runs of several replicas sharing one PostgreSQL.
_MIGRATION_LOCK_ID = 0x61692D62696C6C  # "ai-bill"


def _run(connection: Connection) -> None:
    is_postgres = connection.dialect.name == "postgresql"
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=not is_postgres,
        compare_type=True,
    )
    with context.begin_transaction():
        if is_postgres:
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID}
            )
        context.run_migrations()


async def _run_online() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    assert url is not None
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported")
asyncio.run(_run_online())
