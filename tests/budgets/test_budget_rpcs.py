"""BudgetService and budget answers of BillingService over a real gRPC port."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select

from billing.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    billing_pb2,
    billing_pb2_grpc,
    budget_pb2,
    budget_pb2_grpc,
    types_pb2,
    usage_pb2,
    usage_pb2_grpc,
)
from billing_service.app import Application
from billing_service.config import Settings
from billing_service.storage.tables import budget_periods, budget_requests, budgets
from tests.support.clock import FakeClock
from tests.support.grpc_errors import rich_error
from tests.support.postgres import PostgresServer

START = datetime(2026, 3, 4, 12, tzinfo=UTC)
USER = types_pb2.BUDGET_SCOPE_USER
KEY = types_pb2.BUDGET_SCOPE_API_KEY
DAY = types_pb2.BUDGET_PERIOD_DAY


@dataclass
class Server:
    app: Application
    clock: FakeClock
    billing: billing_pb2_grpc.BillingServiceStub
    admin: admin_pb2_grpc.AdminServiceStub
    budgets: budget_pb2_grpc.BudgetServiceStub
    usage: usage_pb2_grpc.UsageServiceStub


@pytest.fixture(params=["sqlite", "postgresql"])
async def server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Server]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"
    else:
        postgres: PostgresServer = request.getfixturevalue("postgres_server")
        url = postgres.create_database(f"budgets_{uuid.uuid4().hex[:12]}")
    clock = FakeClock(START)
    app = await Application.start(
        Settings(database_url=url, listen_address="127.0.0.1:0"), clock=clock
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        yield Server(
            app,
            clock,
            billing_pb2_grpc.BillingServiceStub(channel),
            admin_pb2_grpc.AdminServiceStub(channel),
            budget_pb2_grpc.BudgetServiceStub(channel),
            usage_pb2_grpc.UsageServiceStub(channel),
        )
    finally:
        await channel.close()
        await app.stop(grace_s=0)


def rid() -> str:
    return str(uuid.uuid4())


def budget(scope_id: str = "alice", **fields: Any) -> types_pb2.Budget:
    values: dict[str, Any] = {
        "tenant_id": "acme",
        "scope": USER,
        "scope_id": scope_id,
        "limit_micros": 1_000_000,
        "period": DAY,
    }
    values.update(fields)
    return types_pb2.Budget(**values)


async def setup(server: Server) -> None:
    await server.admin.CreateTenant(
        admin_pb2.CreateTenantRequest(
            request_id=rid(), tenant_id="acme", payment_method_on_file=True
        )
    )


async def counts(server: Server) -> list[int]:
    async with server.app.engine.connect() as conn:
        return [
            (await conn.execute(select(func.count()).select_from(table))).scalar_one()
            for table in (budgets, budget_periods, budget_requests)
        ]


async def test_set_get_list_delete_and_replays(server: Server) -> None:
    await setup(server)
    set_request = budget_pb2.SetBudgetRequest(request_id="set-1", budget=budget())
    stored = (await server.budgets.SetBudget(set_request)).budget
    assert (stored.budget, stored.remaining_micros) == (budget(), 1_000_000)
    assert stored.period_start_time.ToDatetime(UTC) == datetime(2026, 3, 4, tzinfo=UTC)
    assert stored.reset_time.ToDatetime(UTC) == datetime(2026, 3, 5, tzinfo=UTC)
    assert (await server.budgets.SetBudget(set_request)).budget == stored
    await server.budgets.SetBudget(
        budget_pb2.SetBudgetRequest(
            request_id=rid(),
            budget=budget("key-1", scope=KEY, period=types_pb2.BUDGET_PERIOD_NONE),
        )
    )
    await server.budgets.SetBudget(
        budget_pb2.SetBudgetRequest(request_id=rid(), budget=budget("bob"))
    )

    got = await server.budgets.GetBudget(
        budget_pb2.GetBudgetRequest(tenant_id="acme", scope=USER, scope_id="alice")
    )
    assert got.budget == stored
    first = await server.budgets.ListBudgets(
        budget_pb2.ListBudgetsRequest(tenant_id="acme", page_size=2)
    )
    rest = await server.budgets.ListBudgets(
        budget_pb2.ListBudgetsRequest(
            tenant_id="acme", page_size=2, page_token=first.next_page_token
        )
    )
    listed = [(u.budget.scope, u.budget.scope_id) for u in [*first.budgets, *rest.budgets]]
    assert listed == [(KEY, "key-1"), (USER, "alice"), (USER, "bob")]
    assert rest.next_page_token == ""
    lifetime = first.budgets[0]
    assert not lifetime.HasField("reset_time")
    assert not lifetime.HasField("period_start_time")

    delete = budget_pb2.DeleteBudgetRequest(
        request_id="del-1", tenant_id="acme", scope=USER, scope_id="bob"
    )
    removed = (await server.budgets.DeleteBudget(delete)).budget
    assert removed.budget == budget("bob")
    assert (await server.budgets.DeleteBudget(delete)).budget == removed
    only_users = await server.budgets.ListBudgets(
        budget_pb2.ListBudgetsRequest(tenant_id="acme", scope=USER)
    )
    assert [u.budget.scope_id for u in only_users.budgets] == ["alice"]

    before = await counts(server)
    other = budget_pb2.SetBudgetRequest(request_id="set-1", budget=budget(limit_micros=2))
    await _expect(
        server.budgets.SetBudget(other), grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED"
    )
    await _expect(
        server.budgets.DeleteBudget(
            budget_pb2.DeleteBudgetRequest(
                request_id="set-1", tenant_id="acme", scope=USER, scope_id="alice"
            )
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
    )
    assert await counts(server) == before


async def test_not_found(server: Server) -> None:
    await setup(server)
    await _expect(
        server.budgets.SetBudget(
            budget_pb2.SetBudgetRequest(request_id=rid(), budget=budget(tenant_id="nobody"))
        ),
        grpc.StatusCode.NOT_FOUND,
        "TENANT_NOT_FOUND",
    )
    key = {"scope": USER, "scope_id": "alice"}
    await _expect(
        server.budgets.GetBudget(budget_pb2.GetBudgetRequest(tenant_id="acme", **key)),
        grpc.StatusCode.NOT_FOUND,
        "BUDGET_NOT_FOUND",
    )
    await _expect(
        server.budgets.GetBudget(budget_pb2.GetBudgetRequest(tenant_id="nobody", **key)),
        grpc.StatusCode.NOT_FOUND,
        "TENANT_NOT_FOUND",
    )
    await _expect(
        server.budgets.ListBudgets(budget_pb2.ListBudgetsRequest(tenant_id="nobody")),
        grpc.StatusCode.NOT_FOUND,
        "TENANT_NOT_FOUND",
    )
    await _expect(
        server.budgets.DeleteBudget(
            budget_pb2.DeleteBudgetRequest(request_id=rid(), tenant_id="acme", **key)
        ),
        grpc.StatusCode.NOT_FOUND,
        "BUDGET_NOT_FOUND",
    )


_BAD = [
    ("SetBudget", budget_pb2.SetBudgetRequest(budget=budget()), "request_id"),
    (
        "SetBudget",
        budget_pb2.SetBudgetRequest(request_id="r", budget=budget(tenant_id="")),
        "budget.tenant_id",
    ),
    (
        "SetBudget",
        budget_pb2.SetBudgetRequest(request_id="r", budget=budget(scope=0)),
        "budget.scope",
    ),
    (
        "SetBudget",
        budget_pb2.SetBudgetRequest(request_id="r", budget=budget("")),
        "budget.scope_id",
    ),
    (
        "SetBudget",
        budget_pb2.SetBudgetRequest(request_id="r", budget=budget("a b")),
        "budget.scope_id",
    ),
    (
        "SetBudget",
        budget_pb2.SetBudgetRequest(request_id="r", budget=budget("x" * 129)),
        "budget.scope_id",
    ),
    (
        "SetBudget",
        budget_pb2.SetBudgetRequest(request_id="r", budget=budget(limit_micros=0)),
        "budget.limit_micros",
    ),
    (
        "SetBudget",
        budget_pb2.SetBudgetRequest(request_id="r", budget=budget(limit_micros=10**12 + 1)),
        "budget.limit_micros",
    ),
    (
        "SetBudget",
        budget_pb2.SetBudgetRequest(request_id="r", budget=budget(period=0)),
        "budget.period",
    ),
    ("GetBudget", budget_pb2.GetBudgetRequest(scope=USER, scope_id="a"), "tenant_id"),
    ("GetBudget", budget_pb2.GetBudgetRequest(tenant_id="acme", scope_id="a"), "scope"),
    ("GetBudget", budget_pb2.GetBudgetRequest(tenant_id="acme", scope=USER), "scope_id"),
    ("ListBudgets", budget_pb2.ListBudgetsRequest(), "tenant_id"),
    ("ListBudgets", budget_pb2.ListBudgetsRequest(tenant_id="acme", page_size=1001), "page_size"),
    ("ListBudgets", budget_pb2.ListBudgetsRequest(tenant_id="acme", page_size=-1), "page_size"),
    (
        "ListBudgets",
        budget_pb2.ListBudgetsRequest(tenant_id="acme", page_token="nope"),
        "page_token",
    ),
    (
        "DeleteBudget",
        budget_pb2.DeleteBudgetRequest(tenant_id="acme", scope=USER, scope_id="a"),
        "request_id",
    ),
    (
        "DeleteBudget",
        budget_pb2.DeleteBudgetRequest(request_id="r", scope=USER, scope_id="a"),
        "tenant_id",
    ),
    (
        "DeleteBudget",
        budget_pb2.DeleteBudgetRequest(request_id="r", tenant_id="acme", scope_id="a"),
        "scope",
    ),
    (
        "DeleteBudget",
        budget_pb2.DeleteBudgetRequest(request_id="r", tenant_id="acme", scope=USER),
        "scope_id",
    ),
]


@pytest.mark.parametrize(("method", "message", "field"), _BAD)
async def test_bad_input_is_invalid_argument_naming_the_field(
    server: Server, method: str, message: Any, field: str
) -> None:
    await setup(server)
    before = await counts(server)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await getattr(server.budgets, method)(message)
    error = rich_error(raised.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "FIELD_INVALID")
    assert error.fields == [field]
    assert await counts(server) == before


async def test_a_budget_denial_and_the_remaining_budgets_on_decisions(server: Server) -> None:
    await setup(server)
    await server.budgets.SetBudget(
        budget_pb2.SetBudgetRequest(request_id=rid(), budget=budget(limit_micros=500_000))
    )
    await server.budgets.SetBudget(
        budget_pb2.SetBudgetRequest(request_id=rid(), budget=budget("key-1", scope=KEY))
    )

    def reserve(request_id: str, amount: int) -> Any:
        return server.billing.ReserveCredit(
            billing_pb2.ReserveCreditRequest(
                request_id=request_id,
                tenant_id="acme",
                user_id="alice",
                api_key_id="key-1",
                model="gpt-4o",
                amount_micros=amount,
            )
        )

    granted = (await reserve("r1", 300_000)).decision
    assert granted.allowed
    assert [(u.budget.scope_id, u.remaining_micros) for u in granted.budgets] == [
        ("alice", 200_000),
        ("key-1", 700_000),
    ]
    denied = await reserve("r2", 300_000)
    decision = denied.decision
    assert decision.reason == types_pb2.DENIAL_REASON_USER_BUDGET_EXHAUSTED
    assert decision.exhausted_budget.budget.scope_id == "alice"
    assert decision.exhausted_budget.reset_time.ToDatetime(UTC) == datetime(2026, 3, 5, tzinfo=UTC)
    assert "2026-03-05T00:00:00Z" in decision.message
    assert not denied.HasField("reservation")
    assert await reserve("r2", 300_000) == denied

    advice = await server.billing.CheckAccess(
        billing_pb2.CheckAccessRequest(
            tenant_id="acme", model="gpt-4o", user_id="alice", api_key_id="key-1"
        )
    )
    assert [u.remaining_micros for u in advice.decision.budgets] == [200_000, 700_000]
    await _expect(
        server.billing.ReserveCredit(
            billing_pb2.ReserveCreditRequest(
                request_id=rid(),
                tenant_id="acme",
                user_id="alice",
                api_key_id="a b",
                model="gpt-4o",
                amount_micros=1,
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "FIELD_INVALID",
    )


async def _expect(call: Any, code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    error = rich_error(raised.value)
    assert (error.code, error.reason) == (code, reason), error.message


async def test_the_usage_summary_shows_every_budget_in_its_current_period(server: Server) -> None:
    await setup(server)
    for request in (
        budget_pb2.SetBudgetRequest(request_id=rid(), budget=budget()),
        budget_pb2.SetBudgetRequest(
            request_id=rid(),
            budget=budget("key-1", scope=KEY, period=types_pb2.BUDGET_PERIOD_WEEK),
        ),
    ):
        await server.budgets.SetBudget(request)
    await server.billing.ReserveCredit(
        billing_pb2.ReserveCreditRequest(
            request_id=rid(),
            tenant_id="acme",
            user_id="alice",
            api_key_id="key-1",
            model="gpt-4o",
            amount_micros=250_000,
        )
    )
    summary = await server.usage.GetUsageSummary(usage_pb2.GetUsageSummaryRequest(tenant_id="acme"))
    shown = [
        (u.budget.scope_id, u.held_micros, u.remaining_micros, u.period_start_time.ToDatetime(UTC))
        for u in summary.budgets
    ]
    assert shown == [
        # 2026-03-04 is a Wednesday: its week began on Monday the 2nd.
        ("key-1", 250_000, 750_000, datetime(2026, 3, 2, tzinfo=UTC)),
        ("alice", 250_000, 750_000, datetime(2026, 3, 4, tzinfo=UTC)),
    ]
