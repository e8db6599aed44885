"""Shared pytest fixtures, grouped by subject under ``# <Subject>`` headers."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.localstripe import LocalStripe
from tests.support.postgres import PostgresServer

# PostgreSQL


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server for the whole session; see ``tests/support/postgres.py``.

    Tests create their own databases on it with ``postgres_server.create_database(name)``.
    """
    if os.environ.get("BILLING_TEST_POSTGRES_URL"):
        pytest.fail(
            "BILLING_TEST_POSTGRES_URL is set, but only throwaway servers are supported so far; "
            "unset it",
            pytrace=False,
        )
    with PostgresServer() as server:
        yield server


# Stripe


@pytest.fixture(scope="session")
def localstripe() -> Iterator[LocalStripe]:
    """One localstripe process for the session; see ``tests/support/localstripe.py``.

    Tests isolate themselves by creating their own tenants (hence Stripe customers), not by
    wiping it, so that tests can share it.
    """
    with LocalStripe() as server:
        yield server
