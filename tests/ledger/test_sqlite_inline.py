"""The single writer's statements below SQLAlchemy's execution layer (storage.sqlite_writer):
for every table of the schema, random rows written and read through a prepared statement on the
pysqlite cursor come out exactly as through SQLAlchemy's `Connection.execute`: the same rows
(values, their types, keys, mappings), the same row counts, the same exception classes."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Date,
    Engine,
    Executable,
    Integer,
    String,
    Table,
    Text,
    and_,
    bindparam,
    create_engine,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.sqltypes import TupleType

from billing_service.core import BillingCore
from billing_service.domain.commands import Commit, CreateTenant, Reserve
from billing_service.domain.pricing import TokenUsage
from billing_service.storage.database import configure_sqlite_connections, sqlite_writer
from billing_service.storage.sqlite_writer import prepare, run_prepared
from billing_service.storage.tables import UtcDateTime, metadata, tenants
from tests.ledger.conftest import TOKENS

TABLES = list(metadata.sorted_tables)

_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12)
_ZONES = st.builds(timezone, st.timedeltas(timedelta(hours=-23), timedelta(hours=23)))


def _values(column: Column[Any]) -> st.SearchStrategy[Any]:
    kind = column.type
    if isinstance(kind, UtcDateTime):
        values: st.SearchStrategy[Any] = st.datetimes(
            min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30), timezones=_ZONES
        )
    elif isinstance(kind, Date):
        values = st.dates(min_value=date(1, 1, 1))
    elif isinstance(kind, Boolean):
        values = st.booleans()
    elif isinstance(kind, BigInteger | Integer):
        values = st.integers(-(2**63), 2**63 - 1)
    elif isinstance(kind, String | Text):
        values = _TEXT
    else:
        raise AssertionError(f"no values for {column} of type {kind!r}")
    return st.none() | values if column.nullable else values


def _rows(table: Table) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({column.name: _values(column) for column in table.columns})


# The statements, built once per table (as the stores build theirs): the same objects each run.
def _key(table: Table) -> Any:
    return and_(*(column == bindparam(f"k_{column.name}") for column in table.primary_key))


STATEMENTS: dict[str, dict[str, Executable]] = {
    table.name: {
        "insert": insert(table),
        "select": select(table).where(_key(table)),
        "count": select(table.c[next(iter(table.columns.keys()))]).where(_key(table)),
        "update": update(table).where(_key(table)).returning(*table.columns),
        "update_plain": update(table).where(_key(table)),
        "delete": delete(table).where(_key(table)),
    }
    for table in TABLES
}


def _engine(path: Path) -> Engine:
    engine = create_engine(
        f"sqlite+pysqlite:///{path}",
        creator=lambda: sqlite3.connect(path, check_same_thread=False),
    )
    configure_sqlite_connections(engine)
    metadata.create_all(engine)
    return engine


@pytest.fixture(scope="module")
def connections(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Connection, Connection]]:
    """One connection for SQLAlchemy's path and one for the prepared path, on two databases
    that get the same writes in the same order."""
    directory = tmp_path_factory.mktemp("inline")
    engines = [_engine(directory / "sqlalchemy.db"), _engine(directory / "inline.db")]
    with engines[0].connect() as through_sqlalchemy, engines[1].connect() as inline:
        yield through_sqlalchemy, inline
    for engine in engines:
        engine.dispose()


def _outcome(run: Callable[[], Any], returns_rows: bool) -> tuple[Any, ...]:
    try:
        result = run()
        rows = result.all() if returns_rows else None
    except DBAPIError as error:
        return ("error", type(error), type(error.orig), str(error.orig))
    except StatementError as error:
        return ("error", type(error), type(error.orig), str(error.orig))
    if rows is None:
        return ("done", result.rowcount)
    keys = list(result.keys())
    return (
        "rows",
        keys,
        [repr(tuple(row)) for row in rows],
        [repr(dict(row._mapping)) for row in rows],
        [{name: getattr(row, name) for name in keys} for row in rows],
        result.rowcount,
    )


def _both(
    connections: tuple[Connection, Connection],
    statement: Executable,
    params: dict[str, Any],
    returns_rows: bool,
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    through_sqlalchemy, inline = connections
    prepared = prepare(statement, tuple(params), inline.dialect)
    assert prepared is not None, statement
    driver = inline.connection.driver_connection
    assert isinstance(driver, sqlite3.Connection)
    return (
        _outcome(lambda: through_sqlalchemy.execute(statement, params), returns_rows),
        _outcome(lambda: run_prepared(driver, prepared, params), returns_rows),
    )


@pytest.mark.parametrize("table", TABLES, ids=[table.name for table in TABLES])
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_every_table_reads_and_writes_the_same_inline(
    connections: tuple[Connection, Connection], table: Table, data: st.DataObject
) -> None:
    first = data.draw(_rows(table))
    second = data.draw(_rows(table))
    # Sometimes a row whose key is taken: the same IntegrityError both ways.
    again = data.draw(st.booleans())
    key = {f"k_{column.name}": first[column.name] for column in table.primary_key}
    statements = STATEMENTS[table.name]
    changed = {
        name: value
        for name, value in second.items()
        if name not in key and not table.c[name].primary_key
    }
    steps: list[tuple[Executable, dict[str, Any], bool]] = [
        (statements["insert"], first, False),
        *([(statements["insert"], first, False)] if again else []),
        (statements["select"], key, True),
        (statements["update"], {**changed, **key}, True),
        (statements["count"], key, True),
        (statements["update_plain"], {**first, **key}, False),
        (statements["select"], key, True),
        (statements["delete"], key, False),
        (statements["count"], key, True),
    ]
    for statement, params, returns_rows in steps:
        expected, got = _both(connections, statement, params, returns_rows)
        assert got == expected, str(statement)


def test_a_constraint_fails_as_sqlalchemys_integrity_error(
    connections: tuple[Connection, Connection],
) -> None:
    row = {column.name: None for column in tenants.columns}
    expected, got = _both(connections, STATEMENTS["tenants"]["insert"], row, False)
    assert got == expected
    assert got[1] is IntegrityError


def test_a_value_its_type_refuses_fails_as_sqlalchemys_statement_error(
    connections: tuple[Connection, Connection],
) -> None:
    # UtcDateTime refuses a naive datetime in its bind processor.
    statement = STATEMENTS["tenants"]["update_plain"]
    params = {"updated_at": datetime(2026, 1, 1), "k_tenant_id": "t"}
    expected, got = _both(connections, statement, params, False)
    assert got == expected
    assert got[1] is StatementError
    assert got[2] is ValueError


def test_the_semi_private_compiler_attributes_it_reads() -> None:
    """prepare reads SQLAlchemy's `_result_columns` (keyname, name, objects, type per column),
    `_ordered_columns`, `_textual_ordered_columns`, `_ad_hoc_textual`,
    `_loose_column_name_matching` and `TypeEngine._is_tuple_type`."""
    statement = select(tenants.c.tenant_id, tenants.c.created_at.label("at"))
    compiled = statement.compile(dialect=create_engine("sqlite://").dialect)
    assert isinstance(compiled, SQLCompiler)
    columns = compiled._result_columns
    assert [(c.keyname, c.name) for c in columns] == [("tenant_id", "tenant_id"), ("at", "at")]
    assert tenants.c.tenant_id in columns[0].objects
    assert isinstance(columns[1].type, UtcDateTime)
    assert compiled._ordered_columns is True
    assert not compiled._textual_ordered_columns
    assert not compiled._ad_hoc_textual
    assert not compiled._loose_column_name_matching
    assert UtcDateTime()._is_tuple_type is False
    assert TupleType(Integer(), String())._is_tuple_type is True


@pytest.fixture
def backend() -> str:
    return "sqlite"


async def test_a_querys_statements_all_run_prepared(core: BillingCore, engine: AsyncEngine) -> None:
    await core.create_tenant(CreateTenant("c", "acme", 10_000_000, payment_method_on_file=True))
    statements = sqlite_writer(engine).statements

    async def query(n: int) -> None:
        reserved = await core.reserve(Reserve(f"r{n}", "acme", "u", TOKENS, amount_micros=30_000))
        assert reserved.hold is not None
        await core.commit(Commit(f"c{n}", reserved.hold.hold_id, TokenUsage(1_000, 0, 0)))

    await query(0)  # each statement seen once: through SQLAlchemy
    before = (statements.prepared_runs, statements.fallback_runs)
    await query(1)
    prepared = statements.prepared_runs - before[0]
    assert prepared >= 5
    assert statements.fallback_runs == before[1]
