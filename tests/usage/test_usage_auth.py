"""UsageService behind authentication: product backends and operators may read it, chat
services may not; the streaming export is guarded like the unary methods."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from billing.v1 import admin_pb2, admin_pb2_grpc, usage_pb2, usage_pb2_grpc
from billing_service.app import Application
from billing_service.config import Settings
from tests.support.grpc_errors import rich_error

TOKENS = {
    "chat-service": "chat-token-0123456789abcdef",
    "operator": "operator-token-0123456789abcdef",
    "product-backend": "backend-token-0123456789abcdef",
}


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Application]:
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}",
        listen_address="127.0.0.1:0",
        auth_tokens=", ".join(f"{role}={token}" for role, token in TOKENS.items()),
    )
    app = await Application.start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            await admin_pb2_grpc.AdminServiceStub(channel).CreateTenant(
                admin_pb2.CreateTenantRequest(request_id="create-acme", tenant_id="acme"),
                metadata=bearer("operator"),
            )
        yield app
    finally:
        await app.stop(grace_s=0)


def bearer(role: str | None) -> tuple[tuple[str, str], ...]:
    return () if role is None else (("authorization", f"Bearer {TOKENS[role]}"),)


async def calls(stub: usage_pb2_grpc.UsageServiceStub, role: str | None) -> None:
    metadata = bearer(role)
    await stub.GetUsageSummary(
        usage_pb2.GetUsageSummaryRequest(tenant_id="acme"), metadata=metadata
    )
    start, end = Timestamp(seconds=0), Timestamp(seconds=86400)
    stream = stub.ExportUsageCsv(
        usage_pb2.ExportUsageCsvRequest(tenant_id="acme", start_time=start, end_time=end),
        metadata=metadata,
    )
    chunks = [chunk.csv_data async for chunk in stream]
    assert b"".join(chunks).startswith(b"reservation_id,")


@pytest.mark.parametrize("role", ["product-backend", "operator"])
async def test_product_backends_and_operators_may_read_usage(
    server: Application, role: str
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        await calls(usage_pb2_grpc.UsageServiceStub(channel), role)


@pytest.mark.parametrize(
    ("role", "code", "reason"),
    [
        ("chat-service", grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_PERMITTED"),
        (None, grpc.StatusCode.UNAUTHENTICATED, "CREDENTIALS_MISSING"),
    ],
)
async def test_others_are_refused_the_summary_and_the_export(
    server: Application, role: str | None, code: grpc.StatusCode, reason: str
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = usage_pb2_grpc.UsageServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.GetUsageSummary(
                usage_pb2.GetUsageSummaryRequest(tenant_id="acme"), metadata=bearer(role)
            )
        assert (rich_error(raised.value).code, rich_error(raised.value).reason) == (code, reason)
        stream = stub.ExportUsageCsv(
            usage_pb2.ExportUsageCsvRequest(tenant_id="acme"), metadata=bearer(role)
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            [chunk async for chunk in stream]
        assert (rich_error(raised.value).code, rich_error(raised.value).reason) == (code, reason)
