"""Schema migrations (Alembic), run by `billing-service migrate` or on start-up."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config

_SCRIPTS = Path(__file__).with_name("migrations")


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_SCRIPTS))
    # Alembic's config is an INI file: '%' must be escaped (URL-encoded passwords contain it).
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade_to_head(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "head")


async def migrate(database_url: str) -> None:
    """Brings the schema up to date. Alembic's env runs its own event loop: use a thread."""
    await asyncio.to_thread(upgrade_to_head, database_url)
