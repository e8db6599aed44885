"""A real server on a real port (in this process), over SQLite and over PostgreSQL."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from billing.v1 import admin_pb2_grpc, billing_pb2_grpc
from billing_service.app import Application
from billing_service.config import Settings
from tests.support.clock import FakeClock
from tests.support.postgres import PostgresServer

_database_numbers = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database(f"api_{next(_database_numbers)}")


@dataclass
class Client:
    app: Application
    clock: FakeClock
    channel: grpc.aio.Channel
    billing: billing_pb2_grpc.BillingServiceStub
    admin: admin_pb2_grpc.AdminServiceStub


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[Client]:
    settings = Settings(
        database_url=database_url,
        listen_address="127.0.0.1:0",
        expiry_sweep_interval_s=0.05,
    )
    clock = FakeClock()
    app = await Application.start(settings, clock=clock)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        yield Client(
            app,
            clock,
            channel,
            billing_pb2_grpc.BillingServiceStub(channel),
            admin_pb2_grpc.AdminServiceStub(channel),
        )
    finally:
        await channel.close()
        await app.stop(grace_s=0)
