"""Holds that grow, under real concurrency: 48 streams of one tenant, half of them by one end
user with a budget, extend their holds chunk by chunk at once from two client processes against
two server processes sharing one PostgreSQL, until each is denied, then commit (some above their
hold). No extension is granted past the tenant's cap or the user's budget, both fill to within
one chunk, and the books balance to the micro.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import select

from billing.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    billing_pb2,
    budget_pb2,
    budget_pb2_grpc,
    types_pb2,
)
from billing_service.storage.audit import audit_ledger
from billing_service.storage.database import create_engine
from billing_service.storage.tables import budget_periods, holds, tenants
from tests.ledger.books import ledger_problems
from tests.support.load_client import Stream, Streamed, stream_many
from tests.support.postgres import PostgresServer
from tests.support.server_process import ServerProcess

TENANT = "streaming-tenant"
LIMIT = 1_000_003
BUDGET = 300_001  # the budget of user "budgeted"
STREAMS_PER_USER = 24
FIRST = 10_000
CHUNK = 1_001  # output tokens per extension, one micro each
CLIENT_PROCESSES = 2

# One output token costs one micro, so the test chooses every amount exactly.
PRICES = """
[models."unit-priced"]
billing = "metered"
output_micros_per_mtok = 1_000_000
"""

pytestmark = pytest.mark.slow


async def _database_state(url: str) -> dict[str, Any]:
    engine = create_engine(url, pool_size=2)
    try:
        async with engine.connect() as conn:
            tenant = (
                await conn.execute(select(tenants).where(tenants.c.tenant_id == TENANT))
            ).one()
            periods = (await conn.execute(select(budget_periods))).all()
            hold_rows = (await conn.execute(select(holds))).all()
        return {
            "tenant": tenant,
            "periods": periods,
            "holds": hold_rows,
            "audit": await audit_ledger(engine),
            "problems": await ledger_problems(engine),
        }
    finally:
        await engine.dispose()


def test_many_streams_extending_at_once_on_two_servers_stay_within_cap_and_budget(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.create_database(f"extend_{uuid.uuid4().hex[:12]}")
    price_table = tmp_path / "prices.toml"
    price_table.write_text(PRICES)
    settings = {
        "BILLING_DATABASE_URL": url,
        "BILLING_LISTEN_ADDRESS": "127.0.0.1:0",
        "BILLING_PRICE_TABLE": str(price_table),
        "BILLING_DB_POOL_SIZE": "10",
    }
    with ServerProcess(settings) as first, ServerProcess(settings) as second:
        addresses = [first.address, second.address]
        with grpc.insecure_channel(first.address) as channel:
            admin_pb2_grpc.AdminServiceStub(channel).CreateTenant(
                admin_pb2.CreateTenantRequest(
                    request_id="create",
                    tenant_id=TENANT,
                    credit_limit_micros=LIMIT,
                    payment_method_on_file=True,
                )
            )
            budget_pb2_grpc.BudgetServiceStub(channel).SetBudget(
                budget_pb2.SetBudgetRequest(
                    request_id="budget",
                    budget=types_pb2.Budget(
                        tenant_id=TENANT,
                        scope=types_pb2.BUDGET_SCOPE_USER,
                        scope_id="budgeted",
                        limit_micros=BUDGET,
                        period=types_pb2.BUDGET_PERIOD_MONTH,
                    ),
                )
            )
        streams = [
            Stream(
                f"stream-{user}-{n}",
                TENANT,
                user,
                "unit-priced",
                FIRST,
                CHUNK,
                # A third commit 5,000 micros above their hold: bounded by the cap and budget.
                5_000 if n % 3 == 0 else 0,
            )
            for n in range(STREAMS_PER_USER)
            for user in ("budgeted", "free")
        ]
        context = multiprocessing.get_context("spawn")
        with context.Pool(CLIENT_PROCESSES) as pool:
            results: list[Streamed] = [
                result
                for chunk in pool.starmap(
                    stream_many,
                    [(addresses, streams[i::CLIENT_PROCESSES]) for i in range(CLIENT_PROCESSES)],
                )
                for result in chunk
            ]
        assert first.terminate() == 0
        assert second.terminate() == 0

    assert all(result.allowed for result in results)
    denials: Counter[int] = Counter()
    held_at_end = {"budgeted": 0, "free": 0}
    for result in results:
        answers = [billing_pb2.ExtendHoldResponse.FromString(raw) for raw in result.extensions]
        *grants, denial = answers
        for grant in grants:
            # Never granted past the cap or the budget.
            assert grant.decision.allowed
            assert grant.extended_micros == CHUNK
            assert grant.decision.available_credit_micros >= 0
            assert all(usage.remaining_micros >= 0 for usage in grant.decision.budgets)
        assert not denial.decision.allowed
        assert denial.extended_micros == 0
        # The hold covers exactly what was reported streamed: no more tokens past it.
        assert denial.covered_output_tokens == 0
        assert denial.reservation.amount_micros == result.held_micros
        assert result.held_micros == FIRST + CHUNK * len(grants)
        denials[denial.decision.reason] += 1
        if denial.decision.reason == types_pb2.DENIAL_REASON_CREDIT_LIMIT_REACHED:
            assert 0 <= denial.decision.available_credit_micros < CHUNK
        else:
            assert denial.decision.reason == types_pb2.DENIAL_REASON_USER_BUDGET_EXHAUSTED
            assert result.stream.user_id == "budgeted"
            assert 0 <= denial.decision.exhausted_budget.remaining_micros < CHUNK
        held_at_end[result.stream.user_id] += result.held_micros
        if result.stream.over_micros == 0:
            assert (result.charged_micros, result.uncollected_micros) == (result.held_micros, 0)
        else:
            assert result.charged_micros + result.uncollected_micros == (
                result.held_micros + result.stream.over_micros
            )
    assert denials[types_pb2.DENIAL_REASON_CREDIT_LIMIT_REACHED] > 0
    assert denials[types_pb2.DENIAL_REASON_USER_BUDGET_EXHAUSTED] > 0

    state = asyncio.run(_database_state(url))
    assert state["audit"] == []
    assert state["problems"] == []
    tenant = state["tenant"]
    assert tenant.held_micros == 0
    charged = sum(result.charged_micros for result in results)
    assert -tenant.balance_micros == charged <= LIMIT
    # The budgeted user never passed the budget; spent is exactly what its commits charged.
    [period] = state["periods"]
    budgeted_charged = sum(r.charged_micros for r in results if r.stream.user_id == "budgeted")
    assert (period.spent_micros, period.held_micros) == (budgeted_charged, 0)
    assert budgeted_charged <= BUDGET
    assert held_at_end["budgeted"] <= BUDGET
    # Every micro an extension added is on its hold and in the ledger's extension entries.
    assert sum(row.extended_micros for row in state["holds"]) == sum(
        result.held_micros - FIRST for result in results
    )
