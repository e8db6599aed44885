"""Coalesced writes on PostgreSQL: ReserveCredit and Commit calls that arrive together are
decided in one round trip (storage.coalescer, storage.postgres_batch), exactly as if they had
been sent one after another in arrival order.

- Random bursts of reservations over a few tenants, with retries of earlier requests among them:
  every answer (grant or denial, the available credit after each grant, the hold of a retry)
  equals the sequential model's, and the books balance after each burst.
- Random bursts of commits of those holds, above and within their holds, with retries: every
  charge equals the domain's settlement in arrival order.
- A batch lost with its connection: every caller of that batch is told UNAVAILABLE, nothing of
  it was kept, and the retries each answer once.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_service.domain.commands import Commit, CreateTenant
from billing_service.domain.errors import ErrorReason, Unavailable
from billing_service.domain.ledger import settle
from billing_service.domain.model import DenialReason, Hold, HoldStatus, TenantStatus
from billing_service.domain.pricing import ModelBilling, ModelPrice, TokenUsage
from billing_service.storage.ledger_store import LedgerStore
from billing_service.storage.postgres_hot_path import RESERVE_BATCH, HotPath
from billing_service.storage.tables import holds
from tests.ledger import examples
from tests.ledger.books import assert_books_balance, money
from tests.support.postgres import PostgresServer

_databases = itertools.count()
_bursts = itertools.count()
# One micro per input token, so a commit's cost is its input token count.
PRICE = ModelPrice("m", ModelBilling.METERED, input_micros_per_mtok=1_000_000)
LIMIT = 100_000
TENANTS = 3


class Runner(examples.Runner):
    def __init__(self, url: str) -> None:
        super().__init__(url, pool_size=8, coalesce=True)
        hot_path = self.store._hot_path
        assert isinstance(hot_path, HotPath)
        self.hot_path = hot_path


@pytest.fixture(scope="module")
def runner(request: pytest.FixtureRequest) -> Iterator[Runner]:
    server: PostgresServer = request.getfixturevalue("postgres_server")
    runner = Runner(server.create_database(f"coalesced_{next(_databases)}"))
    yield runner
    runner.close()


@dataclass(frozen=True)
class Call:
    tenant: int
    amount: int
    # Index of an earlier call this one retries (same request, same answer), or None.
    retry_of: int | None


def _calls(draw: st.DrawFn) -> list[Call]:
    count = draw(st.integers(2, 90))
    calls: list[Call] = []
    for index in range(count):
        if index and draw(st.integers(0, 9)) == 0:
            calls.append(replace(calls[draw(st.integers(0, index - 1))], retry_of=None))
            calls[-1] = Call(calls[-1].tenant, calls[-1].amount, draw(st.integers(0, index - 1)))
            continue
        calls.append(Call(draw(st.integers(0, TENANTS - 1)), draw(st.integers(1, 9_000)), None))
    return calls


bursts = st.composite(_calls)()


def _hold(tenant: str, amount: int, now: datetime) -> Hold:
    return examples.metered_hold(tenant, amount, now, PRICE)


async def _burst(runner: Runner, calls: list[Call], costs: list[int]) -> None:
    store, now = runner.store, datetime.now(UTC)
    burst = next(_bursts)
    names = [f"burst{burst}-t{n}" for n in range(TENANTS)]
    for name in names:
        await store.create_tenant(
            CreateTenant(str(uuid.uuid4()), name, LIMIT, TenantStatus.ACTIVE, True),
            "fp",
            LIMIT,
            now,
        )
    sent: list[Hold] = []
    for call in calls:
        retried = call.retry_of
        sent.append(
            sent[retried] if retried is not None else _hold(names[call.tenant], call.amount, now)
        )

    # The model: the same calls one after another, in arrival order.
    available = dict.fromkeys(names, LIMIT)
    expected: list[tuple[HoldStatus, int]] = []
    for index, hold in enumerate(sent):
        retried = calls[index].retry_of
        if retried is not None:
            expected.append(expected[retried])
        elif hold.amount_micros <= available[hold.tenant_id]:
            available[hold.tenant_id] -= hold.amount_micros
            expected.append((HoldStatus.OPEN, available[hold.tenant_id]))
        else:
            expected.append((HoldStatus.DENIED, available[hold.tenant_id]))

    trips = runner.hot_path.reserves.round_trips
    answers = await asyncio.gather(
        *(store.place_hold(hold, create_with_limit=None) for hold in sent)
    )
    assert [(answer.status, answer.decision_available_micros) for answer in answers] == expected
    assert [answer.hold_id for answer in answers] == [hold.hold_id for hold in sent]
    assert {a.denial_reason for a in answers if a.status is HoldStatus.DENIED} <= {
        DenialReason.CREDIT_LIMIT_REACHED
    }
    if len(calls) > 2:
        assert runner.hot_path.reserves.round_trips - trips < len(calls)
    await assert_books_balance(runner.engine)

    # Commits of every hold granted, at random costs, some above their holds, with retries.
    taken = list(
        {answer.hold_id: answer for answer in answers if answer.status is HoldStatus.OPEN}.values()
    )
    commits = [
        Commit(str(uuid.uuid4()), hold.hold_id, TokenUsage(cost, 0, 0))
        for hold, cost in zip(taken, costs, strict=False)
    ]
    if not commits:
        return
    sent_commits = commits + commits[: len(commits) // 3]
    balance = {name: await money(runner.engine, name) for name in names}
    room = {name: LIMIT + balance[name][0] - balance[name][1] for name in names}
    charged_expected = []
    for command in commits:
        hold = next(hold for hold in taken if hold.hold_id == command.reservation_id)
        settlement = settle(hold, command.usage.input_tokens, room[hold.tenant_id])
        room[hold.tenant_id] += hold.amount_micros - settlement.charged_micros
        charged_expected.append(settlement.charged_micros)
    outcomes = await asyncio.gather(*(store.commit(command, "fp", now) for command in sent_commits))
    charged = [outcome.record.charged_micros for outcome in outcomes]
    assert charged[: len(commits)] == charged_expected
    assert outcomes[len(commits) :] == outcomes[: len(sent_commits) - len(commits)]
    await assert_books_balance(runner.engine)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(calls=bursts, costs=st.lists(st.integers(0, 12_000), min_size=90, max_size=90))
def test_a_burst_is_decided_as_the_same_calls_in_arrival_order(
    runner: Runner, calls: list[Call], costs: list[int]
) -> None:
    runner.loop.run_until_complete(_burst(runner, calls, costs))


@pytest.fixture
def backend() -> str:
    return "postgresql"


@pytest.fixture
def coalescing(engine: AsyncEngine) -> LedgerStore:
    return LedgerStore(engine, coalesce=True)


async def test_a_lost_batch_fails_every_caller_and_keeps_nothing(
    coalescing: LedgerStore, engine: AsyncEngine, database_url: str
) -> None:
    store = coalescing
    now = datetime.now(UTC)
    for name in ("acme", "beta"):
        await store.create_tenant(
            CreateTenant(f"c-{name}", name, LIMIT, TenantStatus.ACTIVE, True), "fp", LIMIT, now
        )
    sent = [_hold("acme", 1_000, now) for _ in range(5)]
    locker = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        transaction = locker.transaction()
        await transaction.start()
        await locker.execute("SELECT 1 FROM tenants WHERE tenant_id = 'acme' FOR UPDATE")
        # A call for another tenant goes alone; the ones that arrive meanwhile go together
        # when it returns, and the batch waits for acme's row.
        first = asyncio.create_task(
            store.place_hold(_hold("beta", 1_000, now), create_with_limit=None)
        )
        batch = [
            asyncio.create_task(store.place_hold(hold, create_with_limit=None)) for hold in sent
        ]
        assert (await first).status is HoldStatus.OPEN
        assert await _terminate_waiting_batch(locker) == 1
        for call in batch:
            with pytest.raises(Unavailable) as raised:
                await call
            assert raised.value.reason is ErrorReason.STORAGE_UNAVAILABLE
        await transaction.rollback()
    finally:
        await locker.close()

    # Nothing of the lost batch was kept.
    async with engine.connect() as conn:
        count = select(func.count()).select_from(holds).where(holds.c.tenant_id == "acme")
        assert (await conn.execute(count)).scalar_one() == 0
    assert await money(engine, "acme") == (0, 0)
    # The retries, at once, each answer once, and again the same.
    retried = await asyncio.gather(*(store.place_hold(h, create_with_limit=None) for h in sent))
    assert [hold.status for hold in retried] == [HoldStatus.OPEN] * 5
    again = await asyncio.gather(*(store.place_hold(h, create_with_limit=None) for h in sent))
    assert again == retried
    assert await money(engine, "acme") == (0, 5 * 1_000)
    await assert_books_balance(engine)


async def _terminate_waiting_batch(locker: Any) -> int:
    """Kills the backend of the batch once it waits for the locked row (bounded: 10 s)."""
    waiting = (
        "FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND query LIKE 'SELECT item, item_outcome%'"
    )
    async with asyncio.timeout(10):
        # The locker is inside a transaction: its view of pg_stat_activity is a snapshot taken
        # once per transaction, unless cleared.
        while not await locker.fetchval(f"SELECT count(*) {waiting}"):
            await locker.execute("SELECT pg_stat_clear_snapshot()")
            await asyncio.sleep(0.01)
    return int(await locker.fetchval(f"SELECT count(pg_terminate_backend(pid, 5000)) {waiting}"))


async def test_a_batch_function_dropped_since_is_created_again(
    coalescing: LedgerStore, engine: AsyncEngine, database_url: str
) -> None:
    store = coalescing
    now = datetime.now(UTC)
    await store.create_tenant(
        CreateTenant("c-acme", "acme", LIMIT, TenantStatus.ACTIVE, True), "fp", LIMIT, now
    )
    hot_path = store._hot_path
    assert isinstance(hot_path, HotPath)

    async def burst() -> None:
        trips = hot_path.reserves.round_trips
        taken = await asyncio.gather(
            *(store.place_hold(_hold("acme", 1_000, now), create_with_limit=None) for _ in range(5))
        )
        assert {hold.status for hold in taken} == {HoldStatus.OPEN}
        assert hot_path.reserves.round_trips - trips == 2  # one alone, then the other four

    await burst()
    admin = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        await admin.execute(f"DROP FUNCTION {RESERVE_BATCH.name}")
    finally:
        await admin.close()
    await burst()
    assert await money(engine, "acme") == (0, 10 * 1_000)
