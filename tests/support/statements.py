"""Every statement an engine's connections send, whichever way they are sent."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine


@contextmanager
def statements_sent(engine: AsyncEngine) -> Iterator[list[str]]:
    """The statements sent while the block runs: SQLAlchemy's executions, and on PostgreSQL
    also those sent through asyncpg directly (storage.postgres_hot_path).

    asyncpg reports a statement from a callback scheduled on the event loop: read the list
    after an await that follows the last call (any further database call will do)."""
    sent: list[str] = []
    watched: list[Any] = []

    def executed(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement)

    def logged(record: Any) -> None:
        sent.append(record.query)

    def checked_out(_dbapi: Any, _record: Any, proxy: Any) -> None:
        driver = proxy.driver_connection
        if engine.dialect.name == "postgresql" and driver not in watched:
            driver.add_query_logger(logged)
            watched.append(driver)

    sync_engine = engine.sync_engine
    event.listen(sync_engine, "before_cursor_execute", executed)
    event.listen(sync_engine.pool, "checkout", checked_out)
    try:
        yield sent
    finally:
        event.remove(sync_engine, "before_cursor_execute", executed)
        event.remove(sync_engine.pool, "checkout", checked_out)
        for driver in watched:
            driver.remove_query_logger(logged)
