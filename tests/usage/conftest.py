"""A real server on a real port (in this process), over SQLite and PostgreSQL, with its clock
in the test's hands and a UsageService stub beside the billing and admin stubs."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from sqlalchemy import func, select

from billing.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    billing_pb2,
    billing_pb2_grpc,
    types_pb2,
    usage_pb2_grpc,
)
from billing_service.app import Application
from billing_service.config import Settings
from billing_service.storage.tables import usage_records
from tests.support.clock import FakeClock
from tests.support.postgres import PostgresServer

_database_numbers = itertools.count()

# Just before a month ends: commits straddle a UTC midnight and a month boundary.
START = datetime(2026, 1, 31, 23, 59, 59, 500_000, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database(f"usage_{next(_database_numbers)}")


def rid() -> str:
    return str(uuid.uuid4())


@dataclass
class Client:
    app: Application
    clock: FakeClock
    billing: billing_pb2_grpc.BillingServiceStub
    admin: admin_pb2_grpc.AdminServiceStub
    usage: usage_pb2_grpc.UsageServiceStub

    async def create_tenant(self, tenant_id: str) -> None:
        await self.admin.CreateTenant(
            admin_pb2.CreateTenantRequest(
                request_id=rid(),
                tenant_id=tenant_id,
                payment_method_on_file=True,
                credit_limit_micros=1_000_000_000,
            )
        )

    async def call(
        self,
        tenant_id: str,
        *,
        model: str = "gpt-4o",
        user_id: str = "user-1",
        input_tokens: int = 1000,
        output_tokens: int = 500,
    ) -> types_pb2.UsageRecord:
        """One model call: reserve, then commit (at the clock's current time)."""
        reserved = await self.billing.ReserveCredit(
            billing_pb2.ReserveCreditRequest(
                request_id=rid(),
                tenant_id=tenant_id,
                user_id=user_id,
                model=model,
                estimate=billing_pb2.QueryEstimate(
                    input_tokens=input_tokens, max_output_tokens=output_tokens
                ),
            )
        )
        assert reserved.decision.allowed, reserved.decision.message
        committed = await self.billing.Commit(
            billing_pb2.CommitRequest(
                request_id=rid(),
                reservation_id=reserved.reservation.reservation_id,
                usage=types_pb2.TokenUsage(
                    input_tokens=input_tokens, cached_input_tokens=7, output_tokens=output_tokens
                ),
            )
        )
        record: types_pb2.UsageRecord = committed.usage_record
        return record

    async def records_count(self, tenant_id: str) -> int:
        async with self.app.engine.connect() as conn:
            count = await conn.execute(
                select(func.count()).where(usage_records.c.tenant_id == tenant_id)
            )
            return int(count.scalar_one())


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[Client]:
    settings = Settings(
        database_url=database_url, listen_address="127.0.0.1:0", expiry_sweep_interval_s=60
    )
    clock = FakeClock(START)
    app = await Application.start(settings, clock=clock)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        yield Client(
            app,
            clock,
            billing_pb2_grpc.BillingServiceStub(channel),
            admin_pb2_grpc.AdminServiceStub(channel),
            usage_pb2_grpc.UsageServiceStub(channel),
        )
    finally:
        await channel.close()
        await app.stop(grace_s=0)
