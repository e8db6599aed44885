"""A Commit whose outcome the client cannot learn: queued behind a row lock past the client's
deadline on every attempt, then applied. The client must never release that hold: it either
gets the commit's answer by retrying the same request id, or raises CommitOutcomeUnknown and
leaves the hold to its expiry. Sync and asyncio clients, on PostgreSQL (where a statement that
waits on a lock outlives the call that sent it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest
from sqlalchemy import select

from billing.client import (
    AsyncBillingClient,
    AsyncHold,
    BillingClient,
    BillingUnavailable,
    CommitOutcomeUnknown,
    Hold,
    RetryEvent,
)
from billing_service.storage.tables import ledger_entries, usage_records
from tests.client.conftest import LIMIT, ServerThread, balance, create_tenant

pytestmark = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)

# Short attempts, so that a commit stuck behind the lock gives up quickly.
ATTEMPT_S = 1.0
ATTEMPTS = 2
# Bound of the wait for the statement queued behind the lock to be applied once it goes.
APPLIED_WITHIN_S = 30.0
USAGE = {"input_tokens": 100, "output_tokens": 20, "cached_input_tokens": 0}  # 120 micros


class RowLock:
    """The lock of one hold's row, held from another connection as a long transaction would
    hold it. Lives on the server's event loop."""

    def __init__(self, server: ServerThread, database_url: str) -> None:
        self._server = server
        self._dsn = database_url.replace("postgresql+asyncpg", "postgresql")
        self._conn: asyncpg.Connection | None = None
        self._hold_id = ""

    def take(self, hold_id: str) -> None:
        self._server.run(self._take(hold_id))

    async def _take(self, hold_id: str) -> None:
        self._hold_id = hold_id
        self._conn = await asyncpg.connect(self._dsn)
        await self._conn.execute("BEGIN")
        await self._conn.execute("SELECT 1 FROM holds WHERE hold_id = $1 FOR UPDATE", hold_id)

    def wait_until_queued(self) -> None:
        self._server.run(self._wait_until_queued())

    async def _wait_until_queued(self) -> None:
        """Waits (bounded) until a statement of another connection waits for this lock."""
        conn = self._conn
        assert conn is not None
        query = "SELECT count(*) FROM pg_locks WHERE NOT granted AND pid <> pg_backend_pid()"
        await _until(conn, query, "no statement waited for the hold's row")

    def let_go(self) -> None:
        self._server.run(self.let_go_and_wait())

    async def let_go_and_wait(self) -> None:
        """Ends the transaction, then waits (bounded) until the commit queued behind the lock
        has been applied: the client's attempts gave up, the database did not."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        try:
            await conn.execute("ROLLBACK")
            query = f"SELECT count(*) FROM usage_records WHERE hold_id = '{self._hold_id}'"
            await _until(conn, query, "the commit queued behind the lock was never applied")
        finally:
            await conn.close()


async def _until(conn: asyncpg.Connection, query: str, failure: str) -> None:
    """Waits until `query` counts a row, checking every 10 ms for at most APPLIED_WITHIN_S."""
    for _ in range(int(APPLIED_WITHIN_S * 100)):
        if await conn.fetchval(query):
            return
        await asyncio.sleep(0.01)
    pytest.fail(failure)


@pytest.fixture
def row_lock(server: ServerThread, database_url: str) -> Iterator[RowLock]:
    lock = RowLock(server, database_url)
    try:
        yield lock
    finally:
        lock.let_go()


def settled_kinds(server: ServerThread, reservation_id: str) -> tuple[list[str], list[str]]:
    """The ledger entries of a hold, and the request ids of its usage records."""

    async def read() -> tuple[list[str], list[str]]:
        async with server.app.engine.connect() as conn:
            kinds = (
                await conn.execute(
                    select(ledger_entries.c.kind)
                    .where(ledger_entries.c.hold_id == reservation_id)
                    .order_by(ledger_entries.c.entry_id)
                )
            ).scalars()
            request_ids = (
                await conn.execute(
                    select(usage_records.c.request_id).where(
                        usage_records.c.hold_id == reservation_id
                    )
                )
            ).scalars()
            return [str(kind) for kind in kinds], [str(rid) for rid in request_ids]

    return server.run(read())


def release_after_the_lock_goes(server: ServerThread, lock: RowLock) -> None:
    """Should a release or a refund be sent, the lock goes just before the server handles it
    (the commit queued behind it is applied first), as when the lock went away between the
    client's last commit attempt and its release."""
    for method in ("Release", "Refund"):
        server.calls.on_arrival(method, lock.let_go_and_wait)


def chat_committing_behind_the_lock(
    client: BillingClient, server: ServerThread, row_lock: RowLock, holds: list[Hold]
) -> None:
    with client.reserve("acme", "u", "unit-priced", input_tokens=100, max_tokens=50) as hold:
        holds.append(hold)
        row_lock.take(hold.reservation_id)
        release_after_the_lock_goes(server, row_lock)
        hold.commit(**USAGE)


async def async_chat_committing_behind_the_lock(
    client: AsyncBillingClient, server: ServerThread, row_lock: RowLock, holds: list[AsyncHold]
) -> None:
    async with client.reserve("acme", "u", "unit-priced", input_tokens=100, max_tokens=50) as hold:
        holds.append(hold)
        row_lock.take(hold.reservation_id)
        release_after_the_lock_goes(server, row_lock)
        await hold.commit(**USAGE)


def test_a_commit_stuck_behind_a_lock_is_never_released(
    server: ServerThread, row_lock: RowLock
) -> None:
    with BillingClient(server.address, timeout_s=ATTEMPT_S, max_attempts=ATTEMPTS) as client:
        create_tenant(client, "acme")
        holds: list[Hold] = []
        with pytest.raises(BillingUnavailable) as raised:
            chat_committing_behind_the_lock(client, server, row_lock, holds)
        (hold,) = holds
        unknown = raised.value
        assert isinstance(unknown, CommitOutcomeUnknown)
        assert (unknown.reservation_id, unknown.usage) == (hold.reservation_id, USAGE)
        assert hold.state == "unknown"
        assert server.calls["Commit"] == ATTEMPTS
        assert (server.calls["Release"], server.calls["Refund"]) == (0, 0)

        row_lock.let_go()
        # The commit was applied after all; retrying the same request id learns its answer.
        record = hold.commit(**USAGE)
        assert hold.state == "committed"
        assert record.charged_micros == 120
        kinds, commit_ids = settled_kinds(server, hold.reservation_id)
        assert (kinds, commit_ids) == (["hold", "debit"], [unknown.request_id])
        # The caller could also retry it later from anywhere with what the error carries.
        again = client.commit(
            unknown.reservation_id, request_id=unknown.request_id, **unknown.usage
        )
        assert again == record
        assert balance(client, "acme").available_credit_micros == LIMIT - 120


def test_a_commit_let_go_during_its_retries_gets_its_answer(
    server: ServerThread, row_lock: RowLock
) -> None:
    retries: list[RetryEvent] = []

    def on_retry(event: RetryEvent) -> None:
        retries.append(event)
        row_lock.let_go()

    with BillingClient(
        server.address, timeout_s=ATTEMPT_S, max_attempts=ATTEMPTS, on_retry=on_retry
    ) as client:
        create_tenant(client, "acme")
        with client.reserve("acme", "u", "unit-priced", input_tokens=100, max_tokens=50) as hold:
            row_lock.take(hold.reservation_id)
            record = hold.commit(**USAGE)
        assert [event.method for event in retries] == ["Commit"]
        assert hold.state == "committed"
        assert record.charged_micros == 120
        assert (server.calls["Release"], server.calls["Refund"]) == (0, 0)
        kinds, _ = settled_kinds(server, hold.reservation_id)
        assert kinds == ["hold", "debit"]
        assert balance(client, "acme").available_credit_micros == LIMIT - 120


async def test_an_async_commit_stuck_behind_a_lock_is_never_released(
    server: ServerThread, row_lock: RowLock
) -> None:
    async with AsyncBillingClient(
        server.address, timeout_s=ATTEMPT_S, max_attempts=ATTEMPTS
    ) as client:
        with BillingClient(server.address, timeout_s=10) as admin:
            create_tenant(admin, "acme")
        holds: list[AsyncHold] = []
        with pytest.raises(BillingUnavailable) as raised:
            await async_chat_committing_behind_the_lock(client, server, row_lock, holds)
        (hold,) = holds
        unknown = raised.value
        assert isinstance(unknown, CommitOutcomeUnknown)
        assert unknown.reservation_id == hold.reservation_id
        assert hold.state == "unknown"
        assert (server.calls["Release"], server.calls["Refund"]) == (0, 0)

        row_lock.let_go()
        record = await hold.commit(**USAGE)
        assert record.charged_micros == 120
        kinds, commit_ids = settled_kinds(server, hold.reservation_id)
        assert (kinds, commit_ids) == (["hold", "debit"], [unknown.request_id])


async def test_an_async_commit_cancelled_mid_call_is_never_released(
    server: ServerThread, row_lock: RowLock
) -> None:
    """A task cancelled while its commit waits (its caller went away): the commit may still be
    applied, so leaving the block releases nothing."""
    async with AsyncBillingClient(server.address, timeout_s=10) as client:
        with BillingClient(server.address, timeout_s=10) as admin:
            create_tenant(admin, "acme")
        holds: list[AsyncHold] = []
        committing = asyncio.Event()

        async def chat() -> None:
            async with client.reserve(
                "acme", "u", "unit-priced", input_tokens=100, max_tokens=50
            ) as hold:
                holds.append(hold)
                row_lock.take(hold.reservation_id)
                release_after_the_lock_goes(server, row_lock)
                committing.set()
                await hold.commit(**USAGE)

        task = asyncio.create_task(chat())
        await asyncio.wait_for(committing.wait(), timeout=30)
        await asyncio.to_thread(row_lock.wait_until_queued)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        (hold,) = holds
        assert hold.state == "unknown"
        assert (server.calls["Release"], server.calls["Refund"]) == (0, 0)
        row_lock.let_go()
        record = await hold.commit(**USAGE)
        assert record.charged_micros == 120
        kinds, _ = settled_kinds(server, hold.reservation_id)
        assert kinds == ["hold", "debit"]
