"""The SQLite default's single writer: one thread that runs whole transactions, one hop each.

aiosqlite runs every driver call on its connection's thread and back: a ReserveCredit plus a
Commit made about 43 such hops (docs/performance.md). Here each transaction body, the same
async function the PostgreSQL path runs, is sent once to a thread that owns one SQLite
connection, and runs there start to end, a transaction at a time; its result comes back in one
hop: the caller's loop is woken once for all the results that finished while it was busy.

On that thread the body's connection is an `InlineConnection`: its `execute` runs the statement
at once on the synchronous pysqlite connection (the driver aiosqlite's dialect is built on: same
types), so an await in the body never suspends and costs no greenlet switch and no event-loop
turn. A statement object the writer has seen before (the bodies' statements are module
constants) runs below SQLAlchemy's execution layer: compiled once per set of parameter names
with the writer engine's dialect, its parameters and result rows converted by the same bind and
result processors SQLAlchemy would use, straight on a pysqlite cursor (`_Prepared`). Anything
else (a statement built per call, seen once; a text() statement; a list of parameter sets;
Python-side column defaults; expanding IN parameters; execution options) goes through
SQLAlchemy's `Connection.execute` as before. The thread keeps the caller's event loop free
while SQLite waits for a lock held by another connection (busy timeout) or writes a WAL
checkpoint.

A caller cancelled while its transaction is queued cancels it before it starts; once started,
a transaction runs to its end (it has no await that yields), so a cancelled caller's outcome
is unknown to it, and its retry with the same request_id replays it.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, CursorResult, Engine, Executable, create_engine
from sqlalchemy.engine import URL, Dialect, IteratorResult
from sqlalchemy.engine.result import SimpleResultMetaData
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

T = TypeVar("T")


class InlineResult(IteratorResult[Any]):
    """The rows of a statement run below SQLAlchemy's execution layer, all fetched, as
    SQLAlchemy `Row`s (`one()`, `scalar_one()`, `scalars()`, `row.name`, `row._mapping`...),
    and the cursor's `rowcount`."""

    rowcount: int


class _Prepared:
    """One statement compiled for one set of parameter names, ready to run on a pysqlite
    cursor: its SQL, the order of its parameters with their bind processors, and the
    metadata (keys and result processors) of the rows it returns."""

    __slots__ = ("compiled", "metadata", "positions", "processors", "sql")

    def __init__(
        self,
        sql: str,
        compiled: SQLCompiler,
        positions: Sequence[str],
        processors: Mapping[str, Callable[[Any], Any]],
        metadata: SimpleResultMetaData,
    ) -> None:
        self.sql = sql
        self.compiled = compiled
        self.positions = positions
        self.processors = processors
        self.metadata = metadata

    def parameters(self, values: Mapping[str, Any] | None) -> tuple[Any, ...]:
        """The DBAPI's positional parameters, as SQLAlchemy's execution context makes them."""
        params = self.compiled.construct_params(values, escape_names=False)
        processors = self.processors
        return tuple(
            processors[key](params[key]) if key in processors else params[key]
            for key in self.positions
        )


def prepare(statement: Executable, keys: Sequence[str], dialect: Dialect) -> _Prepared | None:
    """`statement` compiled as SQLAlchemy compiles it for parameters named `keys`, or None
    when it needs what only SQLAlchemy's execution layer does."""
    if not isinstance(statement, ClauseElement) or statement.get_execution_options():
        return None
    compiled = statement.compile(dialect=dialect, column_keys=sorted(keys))
    if not isinstance(compiled, SQLCompiler) or (
        compiled.isplaintext  # text(): its result columns are matched by name
        or not compiled.positional
        or compiled.insert_prefetch  # Python-side column defaults, computed per execution
        or compiled.update_prefetch
        or compiled.implicit_returning  # the primary key comes back, not rows
        or compiled.literal_execute_params  # rendered per execution
        or compiled.post_compile_params  # expanding IN
        or compiled.escaped_bind_names
        or compiled.schema_translate_map
        or compiled.positiontup is None
    ):
        return None
    processors: dict[str, Callable[[Any], Any]] = {}
    for name, bind in compiled.binds.items():
        # Semi-private, pinned by tests/ledger/test_sqlite_inline.py: a tuple of values (a
        # tuple IN) has one processor per element; not in the bodies.
        if bind.type._is_tuple_type:
            return None
        processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if processor is not None:
            processors[name] = processor
    # Semi-private (SQLAlchemy's own result metadata reads it): the columns a statement
    # returns, in order, with the key, name, column objects and type of each.
    # tests/ledger/test_sqlite_inline.py pins it.
    columns = compiled._result_columns
    if columns and (
        not compiled._ordered_columns
        or compiled._textual_ordered_columns
        or compiled._ad_hoc_textual
        or compiled._loose_column_name_matching
    ):
        return None
    keys_out = [column.keyname for column in columns]
    if len(set(keys_out)) != len(keys_out):
        return None  # an ambiguous key: SQLAlchemy raises on its use
    extras = [
        ((column.name,) if column.name != column.keyname else ()) + tuple(column.objects)
        for column in columns
    ]
    result_processors = [
        column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns
    ]
    metadata = SimpleResultMetaData(
        keys_out,
        extra=extras,
        _processors=result_processors if any(result_processors) else None,
    )
    return _Prepared(compiled.string, compiled, compiled.positiontup, processors, metadata)


class PreparedStatements:
    """Statements prepared (`prepare`) for one dialect, keyed on the statement object and the
    names of its parameters. A statement is prepared the second time it is seen: a statement
    built per call is seen once, and SQLAlchemy's own cache (keyed on its structure) serves it
    better. An entry lives as long as its statement object."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._entries: dict[int, dict[tuple[str, ...], _Prepared | None]] = {}
        self.prepared_runs = 0
        self.fallback_runs = 0

    def get(self, statement: Executable, keys: tuple[str, ...]) -> _Prepared | None:
        by_keys = self._entries.get(id(statement))
        if by_keys is None:
            try:
                weakref.finalize(statement, self._entries.pop, id(statement), None)
            except TypeError:  # not weak-referenceable: never prepared
                return None
            self._entries[id(statement)] = {}
            return None
        try:
            return by_keys[keys]
        except KeyError:
            prepared = by_keys[keys] = prepare(statement, keys, self._dialect)
            return prepared


class InlineConnection:
    """What a transaction body uses of an AsyncConnection (`execute`, `dialect`), run inline
    on a synchronous connection: the awaits of a body on it never suspend."""

    __slots__ = ("_connection", "_driver", "_statements", "dialect")

    def __init__(self, connection: Connection, statements: PreparedStatements) -> None:
        self._connection = connection
        driver = connection.connection.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        self._driver = driver
        self._statements = statements
        self.dialect = connection.dialect

    async def execute(
        self,
        statement: Executable,
        parameters: Any = None,
        *,
        execution_options: Any = None,
    ) -> CursorResult[Any]:
        prepared = (
            self._statements.get(statement, tuple(parameters or ()))
            if execution_options is None and (parameters is None or isinstance(parameters, dict))
            else None
        )
        if prepared is None:
            self._statements.fallback_runs += 1
            return self._connection.execute(
                statement, parameters, execution_options=execution_options
            )
        self._statements.prepared_runs += 1
        return cast(CursorResult[Any], run_prepared(self._driver, prepared, parameters))


def run_prepared(
    driver: sqlite3.Connection, prepared: _Prepared, parameters: Mapping[str, Any] | None
) -> InlineResult:
    """Runs a prepared statement on a pysqlite cursor; a failure comes out as SQLAlchemy's
    path raises it (DBAPIError.instance: IntegrityError, OperationalError, StatementError)."""
    values: tuple[Any, ...] = ()
    try:
        values = prepared.parameters(parameters)
        cursor = driver.cursor()
        try:
            cursor.execute(prepared.sql, values)
            # As SQLAlchemy reports it: read before the rows are fetched (on SQLite the count
            # of an UPDATE ... RETURNING is 0 then; its dialect says such counts are not sane).
            rowcount = cursor.rowcount
            rows = cursor.fetchall()
        finally:
            cursor.close()
    except Exception as error:
        raise cast(
            Exception,
            DBAPIError.instance(prepared.sql, values, error, sqlite3.Error),
        ) from error
    result = InlineResult(prepared.metadata, iter(rows))
    result.rowcount = rowcount
    return result


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
        self.statements = PreparedStatements(self.engine.dialect)
        self.hops = 0
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        # Outcomes of transactions waiting for their callers' loops to take them.
        self._lock = threading.Lock()
        self._outcomes: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        self._thread = threading.Thread(target=self._serve, name="sqlite-writer", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                loop, future, work = item
                # Read on this thread without the loop's help: a plain attribute of the future.
                if future.cancelled():
                    continue  # its caller was cancelled while it was queued
                try:
                    result = _run_inline(work())
                except BaseException as error:  # handed to the waiting caller
                    self._hand_back(loop, (future, False, error))
                else:
                    self._hand_back(loop, (future, True, result))
        finally:
            self.engine.dispose()

    def _hand_back(self, loop: asyncio.AbstractEventLoop, outcome: _Outcome) -> None:
        """Queues an outcome for its caller's loop; wakes the loop only when no earlier outcome
        is waiting for it (that wake-up delivers this one too)."""
        with self._lock:
            waiting = self._outcomes.get(loop)
            if waiting is not None:
                waiting.append(outcome)
                return
            self._outcomes[loop] = [outcome]
        try:
            loop.call_soon_threadsafe(self._deliver, loop)
        except RuntimeError:  # the caller's loop is closed: nobody waits for it
            with self._lock:
                self._outcomes.pop(loop, None)

    def _deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the caller's loop: every outcome waiting for it, in the order they finished."""
        with self._lock:
            outcomes = self._outcomes.pop(loop, [])
        for future, ok, value in outcomes:
            if future.done():
                continue  # its caller was cancelled while it ran
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    async def run(self, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Runs `work()` on the writer's thread; one hop there and one back (shared by the
        transactions that finish while the loop is busy). `work` must never suspend (its
        awaits are on the writer's InlineConnection)."""
        self.hops += 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((loop, future, work))
        return await future

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
                return await body(cast(AsyncConnection, InlineConnection(conn, self.statements)))

    def close(self) -> None:
        """Closes the connection and ends the thread (the work queued before runs first)."""
        if not self._thread.is_alive():
            return
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)


# A transaction for the writer's thread, with its caller's loop and the future it waits on.
_Work = tuple[
    asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[], Coroutine[Any, Any, Any]]
]
# A transaction's future, whether it returned, and what it returned or raised.
_Outcome = tuple["asyncio.Future[Any]", bool, Any]


def _run_inline(coroutine: Coroutine[Any, Any, T]) -> T:
    """Runs a coroutine that never suspends to its end, without an event loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    coroutine.close()
    raise RuntimeError("a transaction on the SQLite writer waited on something")
