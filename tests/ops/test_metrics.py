"""Prometheus metrics scraped over HTTP after real traffic, each value checked against the
answers the calls got and the ledger."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from billing.v1 import admin_pb2, admin_pb2_grpc, billing_pb2, billing_pb2_grpc, types_pb2
from billing_service.app import Application
from tests.ops.conftest import RunningServer
from tests.support.ports import free_port

Reserved = billing_pb2.ReserveCreditResponse
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def rid() -> str:
    return str(uuid.uuid4())


async def scrape(app: Application) -> Samples:
    assert app.metrics_server is not None
    url = f"http://127.0.0.1:{app.metrics_server.port}/metrics"

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    text = await asyncio.to_thread(fetch)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_count_calls_decisions_and_money_exactly(
    running_server: RunningServer,
) -> None:
    async with (
        running_server(metrics_port=free_port()) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        billing = billing_pb2_grpc.BillingServiceStub(channel)
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        await admin.CreateTenant(
            admin_pb2.CreateTenantRequest(
                request_id=rid(),
                tenant_id="acme",
                payment_method_on_file=True,
                credit_limit_micros=1_000_000,
            )
        )
        await admin.GrantCredit(
            admin_pb2.GrantCreditRequest(
                request_id=rid(), tenant_id="acme", amount_micros=5_000, reason="welcome"
            )
        )

        async def reserve(
            amount: int, model: str = "unit-priced"
        ) -> billing_pb2.ReserveCreditResponse:
            answer: billing_pb2.ReserveCreditResponse = await billing.ReserveCredit(
                billing_pb2.ReserveCreditRequest(
                    request_id=rid(),
                    tenant_id="acme",
                    user_id="u",
                    model=model,
                    amount_micros=amount,
                )
            )
            return answer

        granted = [await reserve(amount) for amount in (100_000, 250_000, 70_000)]
        assert all(answer.decision.allowed for answer in granted)
        too_big = await reserve(900_000)
        assert too_big.decision.reason == types_pb2.DENIAL_REASON_CREDIT_LIMIT_REACHED
        unknown = await reserve(1, model="no-such-model")
        assert unknown.decision.reason == types_pb2.DENIAL_REASON_MODEL_NOT_OFFERED
        for _ in range(2):
            await billing.CheckAccess(
                billing_pb2.CheckAccessRequest(tenant_id="acme", model="unit-priced")
            )

        first, second, third = (answer.reservation for answer in granted)
        committed = await billing.Commit(
            billing_pb2.CommitRequest(
                request_id=rid(),
                reservation_id=first.reservation_id,
                usage=types_pb2.TokenUsage(output_tokens=60_000),
            )
        )
        released = await billing.Release(
            billing_pb2.ReleaseRequest(request_id=rid(), reservation_id=second.reservation_id)
        )
        refunded = await billing.Refund(
            billing_pb2.RefundRequest(
                request_id=rid(), reservation_id=first.reservation_id, amount_micros=10_000
            )
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await admin.GetTenant(admin_pb2.GetTenantRequest(tenant_id="nobody"))

        await app.readiness.check()  # refreshes the database-wide gauges now
        samples = await scrape(app)

    assert value(samples, "billing_reserved_micros_total") == 100_000 + 250_000 + 70_000
    assert value(samples, "billing_committed_micros_total") == 60_000
    assert committed.usage_record.charged_micros == 60_000
    assert value(samples, "billing_released_micros_total") == released.released_micros == 250_000
    assert value(samples, "billing_refunded_micros_total") == refunded.amount_micros == 10_000
    assert value(samples, "billing_granted_micros_total") == 5_000
    assert value(samples, "billing_uncollected_micros_total") == 0

    def decisions(rpc: str, decision: str) -> float:
        return value(samples, "billing_decisions_total", rpc=rpc, decision=decision)

    assert decisions("ReserveCredit", "ALLOWED") == 3
    assert decisions("ReserveCredit", "CREDIT_LIMIT_REACHED") == 1
    assert decisions("ReserveCredit", "MODEL_NOT_OFFERED") == 1
    assert decisions("CheckAccess", "ALLOWED") == 2

    def handled(service: str, method: str, code: str) -> float:
        labels = {"grpc_service": f"billing.v1.{service}", "grpc_method": method, "grpc_code": code}
        return value(samples, "grpc_server_handled_total", **labels)

    assert handled("BillingService", "ReserveCredit", "OK") == 5
    assert handled("BillingService", "Commit", "OK") == 1
    assert handled("BillingService", "Refund", "OK") == 1
    assert handled("BillingService", "Release", "OK") == 1
    assert handled("AdminService", "GetTenant", "NOT_FOUND") == 1
    reserve_latency = {
        "grpc_service": "billing.v1.BillingService",
        "grpc_method": "ReserveCredit",
        "grpc_code": "OK",
    }
    assert value(samples, "grpc_server_handling_seconds_count", **reserve_latency) == 5
    assert value(samples, "grpc_server_handling_seconds_bucket", le="+Inf", **reserve_latency) == 5
    assert value(samples, "grpc_server_handling_seconds_sum", **reserve_latency) > 0
    assert value(samples, "billing_rpcs_in_flight") == 0

    # Only the third hold is still open.
    assert value(samples, "billing_holds_open") == 1
    assert value(samples, "billing_holds_open_micros") == third.amount_micros == 70_000
    assert value(samples, "billing_ready") == 1
    # SQLite: one connection, idle between calls.
    assert value(samples, "billing_db_pool_max_connections") == 1
    assert value(samples, "billing_db_pool_connections", state="in_use") == 0
    assert value(samples, "billing_db_pool_connections", state="idle") == 1
    assert value(samples, "process_resident_memory_bytes") > 0


async def test_the_metrics_port_is_off_by_default(running_server: RunningServer) -> None:
    async with running_server() as app:
        assert app.metrics_server is None


async def test_the_service_audits_its_books_at_start_and_exports_the_result(
    running_server: RunningServer,
) -> None:
    async with running_server(metrics_port=free_port(), books_audit_interval_s=120) as app:
        assert app.books_auditor is not None
        await asyncio.wait_for(app.books_auditor.audited.wait(), timeout=60)
        samples = await scrape(app)
    assert value(samples, "billing_books_audit_interval_seconds") == 120
    assert value(samples, "billing_books_audit_last_success_timestamp_seconds") > 0
    assert value(samples, "billing_books_audit_tenants_disagreeing") == 0
    assert value(samples, "billing_books_audit_failures_total") == 0


async def test_the_books_audit_can_be_turned_off(running_server: RunningServer) -> None:
    async with running_server(metrics_port=free_port(), books_audit_interval_s=0) as app:
        assert app.books_auditor is None
        samples = await scrape(app)
    assert value(samples, "billing_books_audit_interval_seconds") == 0
    assert value(samples, "billing_books_audit_last_success_timestamp_seconds") == 0
