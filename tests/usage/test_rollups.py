"""The rollups equal the usage records after any commits, and the PostgreSQL commit that keeps
them is still one statement."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, select

from billing_service.domain.commands import Commit, CreateTenant
from billing_service.domain.model import Hold, HoldStatus, TenantStatus
from billing_service.domain.pricing import ModelBilling, ModelPrice, TokenUsage
from billing_service.storage.database import create_engine
from billing_service.storage.ledger_store import LedgerStore
from billing_service.storage.migrations import migrate
from billing_service.storage.tables import usage_rollups
from billing_service.storage.usage_store import UsageStore
from tests.support.postgres import PostgresServer
from tests.support.statements import statements_sent
from tests.usage.books import rollup_problems

_databases = itertools.count()
_tenants = itertools.count()

MIDNIGHT = datetime(2026, 2, 1, tzinfo=UTC)
PRICES = {
    "metered": ModelPrice("metered", ModelBilling.METERED, 2_000_000, 500_000, 8_000_000, 10),
    "included": ModelPrice("included", ModelBilling.INCLUDED, 1_000_000, 100_000, 4_000_000),
}


class Runner:
    """One event loop and one store for every example (hypothesis calls tests synchronously)."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(migrate(url))
        self.engine = create_engine(url, pool_size=2)
        self.store = LedgerStore(self.engine)

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def close(self) -> None:
        self.run(self.engine.dispose())
        self.loop.close()


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def runner(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Runner]:
    if request.param == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        url = server.create_database(f"rollups_{next(_databases)}")
    else:
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('rollups') / 'billing.db'}"
    runner = Runner(url)
    yield runner
    runner.close()


async def new_tenant(store: LedgerStore) -> str:
    tenant = f"rollup-{next(_tenants)}"
    command = CreateTenant(str(uuid.uuid4()), tenant, 10**12, TenantStatus.ACTIVE, True)
    await store.create_tenant(command, "fp", 10**12, MIDNIGHT - timedelta(days=30))
    return tenant


async def commit_at(
    store: LedgerStore, tenant: str, model: str, user: str, usage: TokenUsage, now: datetime
) -> None:
    price = PRICES[model]
    hold = Hold(
        hold_id=f"rsv_{uuid.uuid4().hex}",
        request_id=str(uuid.uuid4()),
        request_fingerprint="fp",
        tenant_id=tenant,
        user_id=user,
        model=model,
        price=price,
        amount_micros=1_000_000 if price.billing is ModelBilling.METERED else 0,
        status=HoldStatus.OPEN,
        created_at=now - timedelta(seconds=1),
        expires_at=now + timedelta(minutes=5),
        decision_available_micros=0,
    )
    assert (await store.place_hold(hold, create_with_limit=None)).status is HoldStatus.OPEN
    await store.commit(Commit(str(uuid.uuid4()), hold.hold_id, usage), "fp", now)


calls = st.lists(
    st.tuples(
        st.sampled_from(sorted(PRICES)),
        st.sampled_from(["ann", "bob", "cy"]),
        st.builds(
            TokenUsage,
            input_tokens=st.integers(0, 10**6),
            cached_input_tokens=st.integers(0, 10**5),
            output_tokens=st.integers(0, 10**6),
        ),
        # Microseconds from midnight: most calls land within a second of it, on either side.
        st.integers(-(10**6), 10**6) | st.integers(-(10**11), 10**11),
    ),
    min_size=1,
    max_size=12,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(calls=calls)
def test_rollups_equal_the_records_after_random_commits(
    runner: Runner, calls: list[tuple[str, str, TokenUsage, int]]
) -> None:
    async def scenario() -> list[str]:
        tenant = await new_tenant(runner.store)
        for model, user, usage, offset in calls:
            now = MIDNIGHT + timedelta(microseconds=offset)
            await commit_at(runner.store, tenant, model, user, usage, now)
        return await rollup_problems(runner.engine)

    assert runner.run(scenario()) == []


@pytest.mark.parametrize("runner", ["postgresql"], indirect=True)
def test_the_postgresql_commit_with_its_rollup_is_one_statement(runner: Runner) -> None:
    assert runner.engine.dialect.name == "postgresql"

    async def scenario() -> tuple[Any, list[str]]:
        tenant = await new_tenant(runner.store)
        usage = TokenUsage(10, 0, 20)
        await commit_at(runner.store, tenant, "metered", "ann", usage, MIDNIGHT)
        with statements_sent(runner.engine) as sent:
            await commit_at(runner.store, tenant, "metered", "ann", usage, MIDNIGHT)
        async with runner.engine.connect() as conn:
            row = (
                await conn.execute(select(usage_rollups).where(usage_rollups.c.tenant_id == tenant))
            ).one()
        return row, sent

    row, statements = runner.run(scenario())
    # The second call's statements: its reservation, then its commit.
    commits = [s for s in statements if "usage_records" in s]
    assert len(commits) == 1
    assert "INSERT INTO usage_rollups" in commits[0]
    assert len(statements) == 2
    assert row.call_count == 2
    assert (row.input_tokens, row.output_tokens) == (20, 40)


def test_the_summary_lists_the_costliest_thousand_users_and_says_it_cut(runner: Runner) -> None:
    async def scenario() -> Any:
        tenant = await new_tenant(runner.store)
        day = MIDNIGHT.date()
        rows = [
            {
                "tenant_id": tenant,
                "day": day,
                "model": "metered",
                "user_id": f"user-{number:04d}",
                "call_count": 1,
                "input_tokens": 0,
                "cached_input_tokens": 0,
                "output_tokens": 0,
                "cost_micros": number,
                "charged_micros": number,
            }
            for number in range(1, 1003)
        ]
        async with runner.engine.begin() as conn:
            await conn.execute(insert(usage_rollups), rows)
        store = UsageStore(runner.engine)
        return await store.period_usage(tenant, day, day + timedelta(days=1), 1000)

    usage = runner.run(scenario())
    assert usage.by_user_truncated
    assert [user for user, _ in usage.by_user] == [f"user-{n:04d}" for n in range(1002, 2, -1)]
    assert usage.totals.call_count == 1002
    assert usage.totals.cost_micros == sum(range(1, 1003))
