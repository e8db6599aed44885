"""The one-statement calls on PostgreSQL (storage.postgres_hot_path): taken when they apply,
and what a lost or cancelled connection does to them.

The ledger tests run every call on both databases; these pin down what only PostgreSQL has:
that ReserveCredit, Commit, ExtendHold and a release really take the one-statement path (a
regression to the general transaction would pass every other test, only slower), and that a
connection broken under a statement is reported as UNAVAILABLE, never reused, and the retry
with the same request_id answers once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_service.core import BillingCore
from billing_service.domain.commands import Commit, ExtendHold, Refund, Release
from billing_service.domain.errors import ErrorReason, FailedPrecondition, Unavailable
from billing_service.domain.ledger import EntryKind
from billing_service.domain.model import DenialReason
from billing_service.domain.pricing import TokenUsage
from billing_service.storage.database import storage_faults_unavailable, transaction
from billing_service.storage.ledger_store import LedgerStore
from billing_service.storage.postgres_hot_path import HotPath
from billing_service.storage.tables import holds
from tests.ledger.books import assert_books_balance, entry_kinds, money, snapshot
from tests.ledger.test_ledger import ESTIMATE_HOLD, LIMIT, USAGE, USAGE_COST, granted, new_tenant
from tests.support.clock import FakeClock

pytestmark = pytest.mark.parametrize("backend", ["postgresql"])


def record_answers(store: LedgerStore, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """What each one-statement call of `store` answered (None: it fell back)."""
    hot_path = store._hot_path
    assert isinstance(hot_path, HotPath)
    answers: dict[str, list[Any]] = {"reserve": [], "commit": [], "release": [], "extend": []}
    for name, seen in answers.items():
        original: Callable[..., Awaitable[Any]] = getattr(hot_path, name)

        async def recorded(
            *args: Any, _original: Callable[..., Awaitable[Any]] = original, _seen: list[Any] = seen
        ) -> Any:
            answer = await _original(*args)
            _seen.append(answer)
            return answer

        monkeypatch.setattr(hot_path, name, recorded)
    return answers


# 500 more output tokens of the TOKENS model (15 micros each).
MORE = 500
MORE_MICROS = 7_500


def extend(request_id: str, hold_id: str, tokens: int = MORE) -> ExtendHold:
    return ExtendHold(request_id, hold_id, tokens, TokenUsage(1_000, 0, 100))


async def terminate_other_connections(database_url: str) -> int:
    """Kills every other connection to the database (the pool's); returns how many."""
    admin = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await admin.close()
    return int(killed)


async def test_reserve_commit_and_release_each_take_one_statement(
    core: BillingCore, store: LedgerStore, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = record_answers(store, monkeypatch)
    await new_tenant(core)
    committed = await granted(core, "r1")
    released = await granted(core, "r2")
    await core.commit(Commit("c1", committed.hold_id, USAGE))
    outcome = await core.refund(Refund("f1", released.hold_id, 0, "cancelled"))

    assert [answer is not None for answer in answers["reserve"]] == [True, True]
    assert [answer is not None for answer in answers["commit"]] == [True]
    assert [answer is not None for answer in answers["release"]] == [True]
    assert (outcome.kind, outcome.amount_micros) == (EntryKind.RELEASE, ESTIMATE_HOLD)
    assert outcome.available_after_micros == LIMIT - USAGE_COST
    assert await money(engine, "acme") == (-USAGE_COST, 0)


async def test_a_retried_release_falls_back_and_replays(
    core: BillingCore, store: LedgerStore, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = record_answers(store, monkeypatch)
    await new_tenant(core)
    hold = await granted(core, "r1")
    command = Refund("f1", hold.hold_id, 0, "cancelled")
    first = await core.refund(command)
    assert await core.refund(command) == first
    # The retry found no open hold to release: the general transaction replayed the answer.
    assert [answer is not None for answer in answers["release"]] == [True, False]
    assert await money(engine, "acme") == (0, 0)


async def test_a_release_past_the_expire_time_falls_back_and_expires_the_hold(
    core: BillingCore,
    store: LedgerStore,
    engine: AsyncEngine,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers = record_answers(store, monkeypatch)
    await new_tenant(core)
    hold = await granted(core, "r1", ttl=timedelta(seconds=10))
    clock.advance(seconds=10)
    with pytest.raises(FailedPrecondition) as raised:
        await core.release(Release("l1", hold.hold_id))
    assert raised.value.reason is ErrorReason.HOLD_EXPIRED
    # The one statement releases only a live hold: it left this one to the general
    # transaction, which expired it exactly as the sweep does.
    assert [answer is not None for answer in answers["release"]] == [False]
    assert await entry_kinds(engine, "acme") == ["hold", "expiry"]
    assert await money(engine, "acme") == (0, 0)


async def test_a_connection_lost_under_the_pool_is_unavailable_then_replaced(
    core: BillingCore, engine: AsyncEngine, database_url: str
) -> None:
    await new_tenant(core)
    await granted(core, "r1")
    # Three connections in the pool, then a database restart as far as they can tell.
    opened = [await engine.raw_connection() for _ in range(3)]
    for pooled in opened:
        pooled.close()
    assert await terminate_other_connections(database_url) == 3

    with pytest.raises(Unavailable) as raised:
        await granted(core, "r2")
    assert raised.value.reason is ErrorReason.STORAGE_UNAVAILABLE
    # The first fault retired the whole pool: the retry gets a new connection, not a dead one.
    # (Nothing else may touch the pool in between: SQLAlchemy's own execute would retire it.)
    await granted(core, "r2")
    assert await money(engine, "acme") == (0, 2 * ESTIMATE_HOLD)


async def test_a_reserve_cancelled_under_a_lock_is_answered_once_on_retry(
    core: BillingCore, engine: AsyncEngine, database_url: str
) -> None:
    await new_tenant(core)
    locker = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        transaction = locker.transaction()
        await transaction.start()
        await locker.execute("SELECT 1 FROM tenants WHERE tenant_id = 'acme' FOR UPDATE")
        call = asyncio.create_task(granted(core, "r1"))
        await _until_waiting_for_a_lock(locker)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await transaction.rollback()
    finally:
        await locker.close()

    # The cancelled statement may still have run on its abandoned connection: the retry answers
    # with its hold if so, else takes one. Either way there is one hold.
    hold = await granted(core, "r1")
    assert await granted(core, "r1") == hold
    async with engine.connect() as conn:
        count = (await conn.execute(select(func.count()).select_from(holds))).scalar_one()
    assert count == 1
    assert await money(engine, "acme") == (0, ESTIMATE_HOLD)


async def _until_waiting_for_a_lock(locker: asyncpg.Connection) -> None:
    query = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    for _ in range(1000):
        if await locker.fetchval(query):
            return
        await asyncio.sleep(0.01)
    pytest.fail("the call never waited for a row lock")


@pytest.mark.parametrize(("sqlstate", "cause"), [("40P01", "deadlock"), ("40001", "serialization")])
async def test_a_transaction_rolled_back_for_a_conflict_is_unavailable(
    engine: AsyncEngine, sqlstate: str, cause: str
) -> None:
    """PostgreSQL rolls the whole transaction back on a deadlock or a serialization failure:
    nothing was written, so the caller is told to retry (UNAVAILABLE), never INTERNAL."""

    @storage_faults_unavailable
    async def conflicting() -> None:
        async with transaction(engine) as conn:
            await conn.execute(
                text(f"DO $$ BEGIN RAISE EXCEPTION '{cause}' USING ERRCODE = '{sqlstate}'; END $$")
            )

    with pytest.raises(Unavailable) as raised:
        await conflicting()
    assert raised.value.reason is ErrorReason.STORAGE_UNAVAILABLE


@pytest.mark.parametrize(("sqlstate", "cause"), [("40P01", "deadlock"), ("40001", "serialization")])
async def test_a_one_statement_call_rolled_back_for_a_conflict_is_unavailable(
    engine: AsyncEngine, sqlstate: str, cause: str
) -> None:
    """The same on the connections of the one-statement path (asyncpg's own errors): a
    statement or batch chosen as a deadlock's victim is retried by its caller."""
    hot_path = HotPath(engine)
    statement = f"DO $$ BEGIN RAISE EXCEPTION '{cause}' USING ERRCODE = '{sqlstate}'; END $$"

    @storage_faults_unavailable
    async def conflicting() -> None:
        await hot_path._on_connection(statement, lambda driver: driver.execute(statement))

    with pytest.raises(Unavailable) as raised:
        await conflicting()
    assert raised.value.reason is ErrorReason.STORAGE_UNAVAILABLE
    # The connection went back to the pool, fit for the next call.
    assert await hot_path._on_connection("SELECT 1", lambda driver: driver.fetchval("SELECT 1"))


async def test_an_extension_takes_one_statement_and_a_retry_replays_it(
    core: BillingCore,
    store: LedgerStore,
    engine: AsyncEngine,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers = record_answers(store, monkeypatch)
    await new_tenant(core)
    hold = await granted(core, "r1")
    clock.advance(seconds=200)

    first = await core.extend_hold(extend("e1", hold.hold_id))
    grown = await core.extend_hold(extend("e2", hold.hold_id))

    assert first.decision.allowed
    assert grown.decision.allowed
    assert grown.decision.available_micros == LIMIT - ESTIMATE_HOLD - 2 * MORE_MICROS
    assert grown.hold.amount_micros == ESTIMATE_HOLD + 2 * MORE_MICROS
    assert grown.hold.expires_at == clock.now + timedelta(minutes=5)
    assert await money(engine, "acme") == (0, ESTIMATE_HOLD + 2 * MORE_MICROS)
    assert await entry_kinds(engine, "acme") == ["hold", "extension", "extension"]
    before = await snapshot(engine)

    # The retry is the general transaction's: it replays the stored answer, changing nothing.
    clock.advance(seconds=10)
    assert await core.extend_hold(extend("e1", hold.hold_id)) == first
    assert await snapshot(engine) == before
    assert [answer is not None for answer in answers["extend"]] == [True, True, False]

    await core.commit(Commit("c1", hold.hold_id, USAGE))
    assert await money(engine, "acme") == (-USAGE_COST, 0)
    await assert_books_balance(engine)


async def test_a_denied_extension_falls_back_and_is_explained(
    core: BillingCore,
    store: LedgerStore,
    engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers = record_answers(store, monkeypatch)
    await new_tenant(core, limit=ESTIMATE_HOLD + MORE_MICROS - 1)
    hold = await granted(core, "r1")
    before = await snapshot(engine)

    denied = await core.extend_hold(extend("e1", hold.hold_id))

    # The one statement took nothing; the general transaction stored the reason.
    assert [answer is not None for answer in answers["extend"]] == [False]
    assert denied.decision.reason is DenialReason.CREDIT_LIMIT_REACHED
    assert denied.decision.available_micros == MORE_MICROS - 1
    assert denied.decision.required_micros == MORE_MICROS
    assert denied.hold.amount_micros == ESTIMATE_HOLD
    assert await snapshot(engine) == before
    assert await core.extend_hold(extend("e1", hold.hold_id)) == denied
    await assert_books_balance(engine)


async def test_an_extension_past_the_expire_time_falls_back_and_expires_the_hold(
    core: BillingCore,
    store: LedgerStore,
    engine: AsyncEngine,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers = record_answers(store, monkeypatch)
    await new_tenant(core)
    hold = await granted(core, "r1", ttl=timedelta(seconds=10))
    clock.advance(seconds=10)
    with pytest.raises(FailedPrecondition) as raised:
        await core.extend_hold(extend("e1", hold.hold_id))
    assert raised.value.reason is ErrorReason.HOLD_EXPIRED
    assert [answer is not None for answer in answers["extend"]] == [False]
    assert await entry_kinds(engine, "acme") == ["hold", "expiry"]
    assert await money(engine, "acme") == (0, 0)
    await assert_books_balance(engine)


async def test_an_extension_that_waited_for_the_hold_grows_it_as_the_other_left_it(
    core: BillingCore,
    store: LedgerStore,
    engine: AsyncEngine,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The one statement locks the hold first: an extension that waits for another transaction
    holding the hold's row decides on, and grows, the row that transaction committed."""
    answers = record_answers(store, monkeypatch)
    await new_tenant(core)
    hold = await granted(core, "r1")
    later = hold.expires_at + timedelta(hours=1)
    locker = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        transaction = locker.transaction()
        await transaction.start()
        await locker.execute(
            "UPDATE holds SET expires_at = $1 WHERE hold_id = $2", later, hold.hold_id
        )
        call = asyncio.create_task(core.extend_hold(extend("e1", hold.hold_id)))
        await _until_waiting_for_a_lock(locker)
        await transaction.commit()
        grown = await call
    finally:
        await locker.close()

    assert [answer is not None for answer in answers["extend"]] == [True]
    assert grown.decision.allowed
    assert grown.hold.amount_micros == ESTIMATE_HOLD + MORE_MICROS
    assert grown.hold.expires_at == later
    async with engine.connect() as conn:
        row = (await conn.execute(select(holds).where(holds.c.hold_id == hold.hold_id))).one()
    assert (row.amount_micros, row.extended_micros) == (ESTIMATE_HOLD + MORE_MICROS, MORE_MICROS)
    assert (row.expires_at, row.granted_expires_at) == (later, later)
    assert await money(engine, "acme") == (0, ESTIMATE_HOLD + MORE_MICROS)
    assert await entry_kinds(engine, "acme") == ["hold", "extension"]
    await assert_books_balance(engine)
