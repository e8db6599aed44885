"""Engines for PostgreSQL (asyncpg) and SQLite (aiosqlite), and the mapping of faults.

A fault is a database problem that a retry with the same request_id can get past: a lost or
refused connection, a pool exhausted for too long, or a node that is not (or no longer) the
primary. `retires_connection` decides which driver errors mean the connection's node cannot
be written through any more; both the SQLAlchemy path (through `handle_error`) and the
one-statement hot path drop such a connection, with every one opened before it, so the next
call connects afresh and, with `target_session_attrs=read-write`, reaches the new primary.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar

import asyncpg
from sqlalchemy import event
from sqlalchemy.engine import Engine, ExceptionContext, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from billing_service.domain.errors import ErrorReason, Unavailable
from billing_service.storage.sqlite_writer import SqliteWriter

P = ParamSpec("P")
T = TypeVar("T")


def create_engine(url: str, *, pool_size: int = 10, echo: bool = False) -> AsyncEngine:
    """Creates the engine for a SQLAlchemy URL; SQLite gets a serialized, WAL-mode set-up."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_async_engine(url, echo=echo, pool_size=1, max_overflow=0, pool_timeout=60)
        _configure_sqlite(engine.sync_engine)
        return engine
    # No overflow: a connection opened past the pool size is closed again on return, and
    # opening PostgreSQL connections under load costs more than waiting for a pooled one.
    # No pre-ping: it costs up to three round trips per call; a dead connection fails its
    # statement instead, which is reported as UNAVAILABLE and retried by the client with the
    # same request_id, and the pool replaces it.
    engine = create_async_engine(
        url, echo=echo, pool_size=pool_size, max_overflow=0, pool_timeout=30, pool_recycle=3600
    )
    event.listen(engine.sync_engine, "handle_error", _retire_on_node_fault)
    return engine


# SQLSTATE 25006, read_only_sql_transaction: a hot standby, or a primary that its HA manager
# demoted or fenced (default_transaction_read_only). The connection will never write again.
READ_ONLY_SQLSTATE = "25006"

# Errors after which a connection cannot be trusted (asyncpg's own classes; SQLAlchemy wraps
# them). Other errors (a value it cannot encode, a constraint, ...) are not faults: retrying
# would not help.
_CONNECTION_FAULTS = (
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    # No host of a multi-host URL matched target_session_attrs: mid-failover, none is primary.
    asyncpg.TargetServerAttributeNotMatched,
    OSError,
    TimeoutError,
)


def retires_connection(error: BaseException) -> bool:
    """True when `error` (or what it wraps) means the connection's node is gone, refuses
    connections, or no longer takes writes."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, _CONNECTION_FAULTS):
            return True
        if getattr(seen, "sqlstate", None) == READ_ONLY_SQLSTATE:
            return True
        seen = seen.__cause__
    return False


def _retire_on_node_fault(context: ExceptionContext) -> None:
    # A disconnect for SQLAlchemy: it invalidates the connection and the pool's older ones,
    # and the error comes out with connection_invalidated set.
    if not context.is_disconnect and retires_connection(context.original_exception):
        context.is_disconnect = True


# An execution option for a read-only SQLite transaction: a deferred BEGIN, which in WAL mode
# reads one snapshot from its first statement on and never blocks the writer.
SQLITE_SNAPSHOT = "billing_sqlite_snapshot"


def audit_engine(engine: AsyncEngine) -> AsyncEngine:
    """An engine on `engine`'s database without a pool, for a long read that must not hold a
    connection the service's calls and readiness checks wait for (SQLite's pool has one).
    Dispose of it after use."""
    own = create_async_engine(engine.url, poolclass=NullPool)
    if own.dialect.name == "sqlite":
        _configure_sqlite(own.sync_engine)
    return own


def _configure_sqlite(engine: Engine) -> None:
    # SQLite takes its write lock lazily, so two read-then-write transactions could both read
    # before either writes. BEGIN IMMEDIATE takes the lock at the start: transactions are serial.
    configure_sqlite_connections(engine)

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        if connection.get_execution_options().get(SQLITE_SNAPSHOT):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def configure_sqlite_connections(engine: Engine) -> None:
    """WAL, a busy timeout, foreign keys, and transactions begun by the caller, on every new
    connection. (The single writer begins its own: storage.sqlite_writer.)"""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


def is_postgres(connection: AsyncConnection | AsyncEngine) -> bool:
    return connection.dialect.name == "postgresql"


# PoolTimeoutError: every pooled connection stayed busy for pool_timeout; the caller retries.
_FAULTS = (OperationalError, InterfaceError, PoolTimeoutError, OSError, asyncio.TimeoutError)


# serialization_failure, deadlock_detected: PostgreSQL rolled the whole transaction back, so
# nothing was written and the same request retried is safe.
_ROLLED_BACK_SQLSTATES = frozenset({"40001", "40P01"})


def _is_fault(error: BaseException) -> bool:
    if isinstance(error, _FAULTS) or retires_connection(error):
        return True
    if not isinstance(error, DBAPIError):
        return False
    sqlstate = getattr(error.orig, "sqlstate", None)
    return bool(error.connection_invalidated) or sqlstate in _ROLLED_BACK_SQLSTATES


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
        writer = SqliteWriter(engine.url, configure_sqlite_connections)
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
