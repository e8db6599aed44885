"""The SQLite default's single writer: one thread that runs whole transactions, one hop each.

aiosqlite runs every driver call on its connection's thread and back: a ReserveCredit plus a
Commit made about 43 such hops (docs/performance.md). Here each transaction body, the same
async function the PostgreSQL path runs, is sent once to a thread that owns one SQLite
connection, and runs there start to end, a transaction at a time; its result comes back in one
hop.

On that thread the body's connection is an `InlineConnection`: its `execute` runs the statement
at once through SQLAlchemy's synchronous SQLite driver (pysqlite, the dialect aiosqlite's is
built on: same types, same compiled-statement cache), so an await in the body never suspends
and costs no greenlet switch and no event-loop turn. The thread keeps the caller's event loop
free while SQLite waits for a lock held by another connection (busy timeout) or writes a WAL
checkpoint.

A caller cancelled while its transaction is queued cancels it before it starts; once started,
a transaction runs to its end (it has no await that yields), so a cancelled caller's outcome
is unknown to it, and its retry with the same request_id replays it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, CursorResult, Engine, Executable, create_engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

T = TypeVar("T")


class InlineConnection:
    """What a transaction body uses of an AsyncConnection (`execute`, `dialect`), run inline
    on a synchronous connection: the awaits of a body on it never suspend."""

    __slots__ = ("_connection", "dialect")

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self.dialect = connection.dialect

    async def execute(
        self,
        statement: Executable,
        parameters: Any = None,
        *,
        execution_options: Any = None,
    ) -> CursorResult[Any]:
        return self._connection.execute(statement, parameters, execution_options=execution_options)


class SqliteWriter:
    """A thread, a queue of transactions to it, and an engine of one SQLite connection."""

    def __init__(
        self, url: URL, configure: Callable[[Engine], None], *, timeout_s: float = 60
    ) -> None:
        database = url.database or ""
        if database in ("", ":memory:"):
            # The writer's connection and the engine's would each see their own empty database.
            raise ValueError("the SQLite database must be a file, not an in-memory database")
        connector = partial(sqlite3.connect, database, check_same_thread=False)
        self.engine = create_engine(
            url.set(drivername="sqlite+pysqlite"),
            creator=connector,
            pool_size=1,
            max_overflow=0,
            pool_timeout=timeout_s,
        )
        configure(self.engine)
        self.hops = 0
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="sqlite-writer", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                future, work = item
                if not future.set_running_or_notify_cancel():
                    continue  # its caller was cancelled while it was queued
                try:
                    result = _run_inline(work())
                except BaseException as error:  # handed to the waiting caller
                    future.set_exception(error)
                else:
                    future.set_result(result)
        finally:
            self.engine.dispose()

    async def run(self, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Runs `work()` on the writer's thread; one hop there and one back. `work` must
        never suspend (its awaits are on the writer's InlineConnection)."""
        self.hops += 1
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((future, work))
        return await asyncio.wrap_future(future)

    async def transaction(self, body: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """`body` in one transaction (BEGIN IMMEDIATE), committed unless it raises."""
        return await self.run(partial(self._in_transaction, "BEGIN IMMEDIATE", body))

    async def read(self, body: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """`body` in one read transaction: one snapshot of the database, no write lock."""
        return await self.run(partial(self._in_transaction, "BEGIN", body))

    async def _in_transaction(
        self, begin: str, body: Callable[[AsyncConnection], Awaitable[T]]
    ) -> T:
        # The connection is in autocommit mode (database.configure_sqlite_connections), and the
        # engine has no event listeners: the transaction is begun here, on the driver's
        # connection, and SQLAlchemy ends it (COMMIT, or ROLLBACK when the body raises).
        with self.engine.connect() as conn:
            driver_connection = conn.connection.driver_connection
            assert driver_connection is not None
            try:
                driver_connection.execute(begin)
            except sqlite3.Error as error:
                # As SQLAlchemy would raise it (a lock not obtained in time: OperationalError).
                raise DBAPIError.instance(begin, None, error, sqlite3.Error) from error
            with conn.begin():
                return await body(cast(AsyncConnection, InlineConnection(conn)))

    def close(self) -> None:
        """Closes the connection and ends the thread (the work queued before runs first)."""
        if not self._thread.is_alive():
            return
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)


# A transaction for the writer's thread, and the future its caller waits on.
_Work = tuple["concurrent.futures.Future[Any]", Callable[[], Coroutine[Any, Any, Any]]]


def _run_inline(coroutine: Coroutine[Any, Any, T]) -> T:
    """Runs a coroutine that never suspends to its end, without an event loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    coroutine.close()
    raise RuntimeError("a transaction on the SQLite writer waited on something")
