"""Engines for PostgreSQL (asyncpg) and SQLite (aiosqlite), and the mapping of faults."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from billing_service.domain.errors import ErrorReason, Unavailable
from billing_service.storage.sqlite_writer import SqliteWriter

P = ParamSpec("P")
T = TypeVar("T")


def create_engine(url: str, *, pool_size: int = 10, echo: bool = False) -> AsyncEngine:
    """Creates the engine for a SQLAlchemy URL; SQLite gets a serialized, WAL-mode set-up."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_async_engine(url, echo=echo, pool_size=1, max_overflow=0, pool_timeout=60)
        _configure_sqlite(engine)
        return engine
    # No overflow: a connection opened past the pool size is closed again on return, and
    # opening PostgreSQL connections under load costs more than waiting for a pooled one.
    # No pre-ping: it costs up to three round trips per call; a dead connection fails its
    # statement instead, which is reported as UNAVAILABLE and retried by the client with the
    # same request_id, and the pool replaces it.
    return create_async_engine(
        url, echo=echo, pool_size=pool_size, max_overflow=0, pool_timeout=30, pool_recycle=3600
    )


def _configure_sqlite(engine: AsyncEngine) -> None:
    # SQLite takes its write lock lazily, so two read-then-write transactions could both read
    # before either writes. BEGIN IMMEDIATE takes the lock at the start: transactions are serial.
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def is_postgres(connection: AsyncConnection | AsyncEngine) -> bool:
    return connection.dialect.name == "postgresql"


# PoolTimeoutError: every pooled connection stayed busy for pool_timeout; the caller retries.
_FAULTS = (OperationalError, InterfaceError, PoolTimeoutError, OSError, asyncio.TimeoutError)


def _is_fault(error: BaseException) -> bool:
    if isinstance(error, _FAULTS):
        return True
    return isinstance(error, DBAPIError) and bool(error.connection_invalidated)


def storage_faults_unavailable(
    method: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Turns a database fault into Unavailable: the caller retries with the same request_id."""

    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except Exception as error:
            if _is_fault(error):
                raise Unavailable(
                    ErrorReason.STORAGE_UNAVAILABLE, "the billing database is unavailable"
                ) from error
            raise

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


@asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """One transaction: committed when the block ends, rolled back if it raises."""
    async with engine.begin() as connection:
        yield connection


_WRITERS: weakref.WeakKeyDictionary[Engine, SqliteWriter] = weakref.WeakKeyDictionary()


def sqlite_writer(engine: AsyncEngine) -> SqliteWriter:
    """The single writer of a SQLite database (storage.sqlite_writer), made on first use;
    `engine.dispose()` closes it (the next use makes a new one)."""
    sync_engine = engine.sync_engine
    writer = _WRITERS.get(sync_engine)
    if writer is None:
        writer = SqliteWriter(engine.url, _configure_sqlite)
        _WRITERS[sync_engine] = writer
        weakref.finalize(sync_engine, writer.close)
        if not event.contains(sync_engine, "engine_disposed", _close_writer):
            event.listen(sync_engine, "engine_disposed", _close_writer)
    return writer


def _close_writer(sync_engine: Engine) -> None:
    writer = _WRITERS.pop(sync_engine, None)
    if writer is not None:
        writer.close()


class Transactions:
    """How a store runs its transaction bodies (async functions of one connection).

    PostgreSQL: on a pooled connection of the engine; reads in autocommit (no BEGIN/ROLLBACK).
    SQLite: on its single writer's thread, one hop per transaction (storage.sqlite_writer).
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._sqlite = engine.dialect.name == "sqlite"
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")

    async def write(self, body: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """`body` in one transaction, committed unless it raises."""
        if self._sqlite:
            return await sqlite_writer(self._engine).transaction(body)
        async with self._engine.begin() as conn:
            return await body(conn)

    async def read(self, body: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        if self._sqlite:
            return await sqlite_writer(self._engine).read(body)
        async with self._autocommit.connect() as conn:
            return await body(conn)
