"""The SQLite default's single writer: one thread that runs whole transactions, one hop each.

aiosqlite runs every driver call on its connection's thread and back: a ReserveCredit plus a
Commit made about 43 such hops (docs/performance.md). Here each transaction body, the same
async function the PostgreSQL path runs, is sent once to a thread that owns its own event loop
and one SQLite connection whose driver calls run inline (no thread of their own). The body
then never waits on anything: it runs start to end on that thread, a transaction at a time,
and its result comes back in one hop.

The connection is aiosqlite's, with its worker thread replaced by direct calls, so SQLAlchemy's
own aiosqlite dialect (types, statement cache, events) is used unchanged. The thread keeps the
caller's event loop free while SQLite waits for a lock held by another connection (busy
timeout) or writes a WAL checkpoint.

A caller cancelled while its transaction is queued cancels it before it starts; once started,
a transaction runs to its end (it has no await that yields), so a cancelled caller's outcome
is unknown to it, and its retry with the same request_id replays it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Generator
from functools import partial
from typing import Any, TypeVar

import aiosqlite
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

T = TypeVar("T")


class _Inline:
    """Stands for aiosqlite's queue to its worker thread: runs each call at once."""

    def put_nowait(self, item: tuple[asyncio.Future[Any] | None, Callable[[], Any]]) -> None:
        future, function = item
        try:
            result = function()
        except BaseException as error:  # handed to the waiting caller, as the thread would
            if future is not None and not future.done():
                future.set_exception(error)
            return
        if future is not None and not future.done():
            future.set_result(result)


class InlineConnection(aiosqlite.Connection):
    """An aiosqlite connection whose calls run on the calling thread, without a hop."""

    def __init__(self, connector: Callable[[], sqlite3.Connection]) -> None:
        super().__init__(connector, iter_chunk_size=64)
        self._tx = _Inline()  # type: ignore[assignment]

    async def _execute(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if not self._running or not self._connection:
            raise ValueError("Connection closed")
        return fn(*args, **kwargs)

    async def _connect(self) -> InlineConnection:
        if self._connection is None:
            self._connection = self._connector()
        return self

    def __await__(self) -> Generator[Any, None, InlineConnection]:
        return self._connect().__await__()


class SqliteWriter:
    """A thread with its own event loop and an engine of one inline SQLite connection."""

    def __init__(
        self, url: URL, configure: Callable[[AsyncEngine], None], *, timeout_s: float = 60
    ) -> None:
        database = url.database or ""
        if database in ("", ":memory:"):
            # The writer's connection and the engine's would each see their own empty database.
            raise ValueError("the SQLite database must be a file, not an in-memory database")
        connector = partial(sqlite3.connect, database, check_same_thread=False)

        async def connect() -> InlineConnection:
            return await InlineConnection(connector)

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="sqlite-writer", daemon=True)
        self._thread.start()
        self.engine = create_async_engine(
            url,
            async_creator=connect,
            pool_size=1,
            max_overflow=0,
            pool_timeout=timeout_s,
        )
        configure(self.engine)
        self.hops = 0

    def _serve(self) -> None:
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def run(self, work: Callable[[], Awaitable[T]]) -> T:
        """Runs `work()` on the writer's thread; one hop there and one back."""
        self.hops += 1
        future = asyncio.run_coroutine_threadsafe(_awaited(work), self._loop)
        return await asyncio.wrap_future(future)

    async def transaction(self, body: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """`body` in one transaction (BEGIN IMMEDIATE), committed unless it raises."""

        async def work() -> T:
            async with self.engine.begin() as conn:
                return await body(conn)

        return await self.run(work)

    async def read(self, body: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        async def work() -> T:
            async with self.engine.connect() as conn:
                return await body(conn)

        return await self.run(work)

    def close(self) -> None:
        """Closes the connection and ends the thread (the work queued before runs first)."""
        if not self._thread.is_alive():
            return

        async def stop() -> None:
            try:
                await self.engine.dispose()
            finally:
                self._loop.stop()

        asyncio.run_coroutine_threadsafe(stop(), self._loop)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)


async def _awaited(work: Callable[[], Awaitable[T]]) -> T:
    return await work()
