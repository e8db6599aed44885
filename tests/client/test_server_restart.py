"""A hold survives a server restart: the commit that found the server down succeeds on retry
against the restarted server, which shares the database (a SQLite file or PostgreSQL)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from billing.client import AsyncBillingClient, BillingClient, RetryEvent
from tests.client.conftest import LIMIT, balance, create_tenant
from tests.support.ports import free_port
from tests.support.postgres import PostgresServer
from tests.support.server_process import ServerProcess

pytestmark = pytest.mark.slow


class Restarts:
    """Runs the server as a child process on a fixed port; `restart_on_retry` is an `on_retry`
    hook that starts a new server the first time the client retries (the old one is stopped)."""

    def __init__(self, database_url: str, prices: Path) -> None:
        self.port = free_port()
        self.settings = {
            "BILLING_DATABASE_URL": database_url,
            "BILLING_LISTEN_ADDRESS": f"127.0.0.1:{self.port}",
            "BILLING_PRICE_TABLE": str(prices),
        }
        self.servers = [ServerProcess(self.settings)]
        self.retries: list[RetryEvent] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        assert self.servers[-1].terminate() == 0

    def restart_on_retry(self, event: RetryEvent) -> None:
        self.retries.append(event)
        if len(self.servers) == 1:
            self.servers.append(ServerProcess(self.settings))

    def close(self) -> None:
        for server in self.servers:
            server.kill()


@pytest.fixture(params=["sqlite", "postgresql"])
def restarts(request: pytest.FixtureRequest, tmp_path: Path, prices: Path) -> Iterator[Restarts]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"
    else:
        postgres: PostgresServer = request.getfixturevalue("postgres_server")
        url = postgres.create_database(f"client_restart_{uuid.uuid4().hex[:12]}")
    running = Restarts(url, prices)
    try:
        yield running
    finally:
        running.close()


def test_a_commit_after_a_restart_succeeds_on_retry(restarts: Restarts) -> None:
    # A generous deadline: the retry waits for the restarted server to listen.
    with BillingClient(
        restarts.address, timeout_s=60, on_retry=restarts.restart_on_retry
    ) as client:
        create_tenant(client, "acme")
        with client.reserve("acme", "u", "unit-priced", input_tokens=100, max_tokens=50) as hold:
            restarts.stop()
            record = hold.commit(input_tokens=100, output_tokens=20)
        assert len(restarts.servers) == 2
        assert [(r.method, r.attempt) for r in restarts.retries] == [("Commit", 1)]
        assert (record.reservation_id, record.charged_micros) == (hold.reservation_id, 120)
        after = balance(client, "acme")
        assert (after.held_micros, after.available_credit_micros) == (0, LIMIT - 120)


async def test_an_async_commit_after_a_restart_succeeds_on_retry(restarts: Restarts) -> None:
    with BillingClient(restarts.address, timeout_s=60) as admin:
        create_tenant(admin, "acme")
    async with (
        AsyncBillingClient(
            restarts.address, timeout_s=60, on_retry=restarts.restart_on_retry
        ) as client,
        client.reserve("acme", "u", "unit-priced", input_tokens=100, max_tokens=50) as hold,
    ):
        restarts.stop()
        record = await hold.commit(input_tokens=100, output_tokens=20)
    assert len(restarts.servers) == 2
    assert record.charged_micros == 120
    with BillingClient(restarts.address, timeout_s=60) as admin:
        after = balance(admin, "acme")
    assert (after.held_micros, after.available_credit_micros) == (0, LIMIT - 120)
