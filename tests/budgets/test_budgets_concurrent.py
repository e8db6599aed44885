"""Budgets under real concurrency on PostgreSQL: 200 ReserveCredit calls at once from 20 users of
one tenant, each user with a $1/day budget, against a server on a real port."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import grpc
import pytest
from sqlalchemy import select

from billing.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    billing_pb2,
    billing_pb2_grpc,
    budget_pb2,
    budget_pb2_grpc,
    types_pb2,
)
from billing_service.app import Application
from billing_service.config import Settings
from billing_service.storage.audit import audit_ledger
from billing_service.storage.tables import budget_periods, tenants
from tests.ledger.books import ledger_problems
from tests.support.postgres import PostgresServer

USERS = 20
CALLS_PER_USER = 10
AMOUNT = 150_000  # six fit in a $1 budget, with 100,000 left over
BUDGET = 1_000_000
# 100 holds fit under the tenant's limit; the users' budgets would allow 120.
TENANT_LIMIT = 15_000_000
TENANT = "team"

pytestmark = pytest.mark.slow


async def test_200_concurrent_reservations_keep_every_user_in_budget_and_the_tenant_in_cap(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.create_database(f"budgets_{uuid.uuid4().hex[:12]}")
    settings = Settings(database_url=url, listen_address="127.0.0.1:0", db_pool_size=20)
    app = await Application.start(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        await admin.CreateTenant(
            admin_pb2.CreateTenantRequest(
                request_id="create",
                tenant_id=TENANT,
                credit_limit_micros=TENANT_LIMIT,
                payment_method_on_file=True,
            )
        )
        budgets = budget_pb2_grpc.BudgetServiceStub(channel)
        for user in range(USERS):
            await budgets.SetBudget(
                budget_pb2.SetBudgetRequest(
                    request_id=f"budget-{user}",
                    budget=types_pb2.Budget(
                        tenant_id=TENANT,
                        scope=types_pb2.BUDGET_SCOPE_USER,
                        scope_id=f"user-{user}",
                        limit_micros=BUDGET,
                        period=types_pb2.BUDGET_PERIOD_DAY,
                    ),
                )
            )
        billing = billing_pb2_grpc.BillingServiceStub(channel)
        calls = [(f"user-{n % USERS}", f"r-{n}") for n in range(USERS * CALLS_PER_USER)]
        answers = await asyncio.gather(
            *(
                billing.ReserveCredit(
                    billing_pb2.ReserveCreditRequest(
                        request_id=request_id,
                        tenant_id=TENANT,
                        user_id=user,
                        model="gpt-4o",
                        amount_micros=AMOUNT,
                    )
                )
                for user, request_id in calls
            )
        )

        granted: Counter[str] = Counter()
        reasons: Counter[int] = Counter()
        for (user, _), answer in zip(calls, answers, strict=True):
            decision = answer.decision
            reasons[decision.reason] += 1
            [usage] = decision.budgets
            assert usage.budget.scope_id == user
            if decision.allowed:
                granted[user] += 1
                assert usage.remaining_micros >= 0
            elif decision.reason == types_pb2.DENIAL_REASON_USER_BUDGET_EXHAUSTED:
                assert decision.exhausted_budget.budget.scope_id == user
                assert decision.exhausted_budget.remaining_micros < AMOUNT
            else:
                assert decision.reason == types_pb2.DENIAL_REASON_CREDIT_LIMIT_REACHED
                assert decision.available_credit_micros < AMOUNT
        # The tenant fills (the budgets alone would allow more), and no user passes six holds.
        assert sum(granted.values()) == TENANT_LIMIT // AMOUNT
        assert max(granted.values()) <= BUDGET // AMOUNT
        assert set(reasons) <= {
            types_pb2.DENIAL_REASON_UNSPECIFIED,
            types_pb2.DENIAL_REASON_USER_BUDGET_EXHAUSTED,
            types_pb2.DENIAL_REASON_CREDIT_LIMIT_REACHED,
        }
        assert reasons[types_pb2.DENIAL_REASON_CREDIT_LIMIT_REACHED] > 0

        async with app.engine.connect() as conn:
            tenant = (
                await conn.execute(select(tenants).where(tenants.c.tenant_id == TENANT))
            ).one()
            held_by_user: dict[str, int] = defaultdict(int)
            for row in await conn.execute(select(budget_periods)):
                assert row.spent_micros + row.held_micros <= BUDGET
                held_by_user[row.scope_id] += row.held_micros
        assert tenant.held_micros == TENANT_LIMIT // AMOUNT * AMOUNT <= TENANT_LIMIT
        assert {user: held for user, held in held_by_user.items() if held} == {
            user: count * AMOUNT for user, count in granted.items()
        }
        assert await audit_ledger(app.engine) == []
        assert await ledger_problems(app.engine) == []
    finally:
        await channel.close()
        await app.stop(grace_s=0)
