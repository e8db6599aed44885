"""Fixtures of the ledger tests: the billing core over a fresh, migrated database per test.

Every test that takes `backend` (or anything built on it) runs twice: on SQLite and on
PostgreSQL. Migrating takes a fraction of a second, so each backend is migrated once per session
into a template (a file copied per test; a PostgreSQL `CREATE DATABASE ... TEMPLATE`).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_service.core import BillingCore, CoreSettings
from billing_service.domain.pricing import ModelBilling, ModelPrice, PriceTable
from billing_service.storage.database import create_engine
from billing_service.storage.ledger_store import LedgerStore
from billing_service.storage.migrations import upgrade_to_head
from tests.ledger.books import assert_books_balance
from tests.support.clock import FakeClock
from tests.support.postgres import PostgresServer

BACKENDS = ["sqlite", "postgresql"]

# The price table of the ledger tests: one model of each kind.
FLAT = "metered-flat"  # metered, $0.25 per call whatever its size
TOKENS = "metered-tokens"  # metered, $3 / $0.30 / $15 per million input / cached / output tokens
INCLUDED = "included-chat"  # included: recorded at $1 / $0.10 / $5, never charged
PRICES = PriceTable(
    {
        FLAT: ModelPrice(FLAT, ModelBilling.METERED, flat_micros_per_call=250_000),
        TOKENS: ModelPrice(
            TOKENS,
            ModelBilling.METERED,
            input_micros_per_mtok=3_000_000,
            cached_input_micros_per_mtok=300_000,
            output_micros_per_mtok=15_000_000,
        ),
        INCLUDED: ModelPrice(
            INCLUDED,
            ModelBilling.INCLUDED,
            input_micros_per_mtok=1_000_000,
            cached_input_micros_per_mtok=100_000,
            output_micros_per_mtok=5_000_000,
        ),
    }
)
START = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _in_thread(function: Callable[[str], None], argument: str) -> None:
    """Alembic's env calls asyncio.run, which cannot run on a thread with a running loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(function, argument).result()


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


# Databases


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ledger-template") / "template.db"
    _in_thread(upgrade_to_head, f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_template(postgres_server: PostgresServer) -> str:
    name = unique_name("ledger_template")
    _in_thread(upgrade_to_head, postgres_server.create_database(name))
    return name


async def _admin(server: PostgresServer, statement: str) -> None:
    conn = await asyncpg.connect(
        host=server.host, port=server.port, user=server.user, database="postgres"
    )
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def postgres_database(request: pytest.FixtureRequest) -> tuple[PostgresServer, str]:
    """A new database cloned from the migrated template; returns the server and its name."""
    server: PostgresServer = request.getfixturevalue("postgres_server")
    template: str = request.getfixturevalue("postgres_template")
    name = unique_name("ledger")
    await _admin(server, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return server, name


async def drop_postgres_database(server: PostgresServer, name: str) -> None:
    await _admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def database_url(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[str]:
    """A fresh, migrated database of `backend`, dropped after the test."""
    if backend == "sqlite":
        path = tmp_path / "ledger.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    server, name = await postgres_database(request)
    yield server.url(name)
    await drop_postgres_database(server, name)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url, pool_size=5)
    yield engine
    await engine.dispose()


# The core


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def store(engine: AsyncEngine) -> LedgerStore:
    return LedgerStore(engine)


CoreFactory = Callable[..., BillingCore]


@pytest.fixture
async def make_core(
    store: LedgerStore, clock: FakeClock, engine: AsyncEngine
) -> AsyncIterator[CoreFactory]:
    """Builds cores over the test's database with other settings; the books are checked after."""

    def make(settings: CoreSettings | None = None, prices: PriceTable = PRICES) -> BillingCore:
        return BillingCore(store, prices, settings or CoreSettings(), clock)

    yield make
    await assert_books_balance(engine)


@pytest.fixture
def core(make_core: CoreFactory) -> BillingCore:
    """The core with the default settings: tenants auto-create with a $25 limit."""
    return make_core()
