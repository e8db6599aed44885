"""The ledger tests' fixtures (a migrated database per test, on SQLite and PostgreSQL)."""

from tests.ledger.conftest import (  # noqa: F401
    backend,
    clock,
    core,
    database_url,
    engine,
    make_core,
    postgres_template,
    sqlite_template,
    store,
)
