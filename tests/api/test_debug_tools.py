"""What operators debug the service with: grpcurl and buf curl, through server reflection."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest

from tests.api.conftest import Client
from tests.support.tools import tool

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

METHODS = {
    "billing.v1.BillingService": [
        "CheckAccess",
        "ReserveCredit",
        "Commit",
        "Refund",
        "Release",
        "ExtendHold",
    ],
    "billing.v1.AdminService": [
        "CreateTenant",
        "UpdateTenant",
        "GetTenant",
        "GrantCredit",
        "ListTenants",
        "ListCharges",
        "ResolveCharge",
        "ListOpenHolds",
    ],
    "billing.v1.AccountService": [
        "GetBillingProfile",
        "CreateSetupIntent",
        "ConfirmPaymentMethod",
        "RemovePaymentMethod",
        "UpdateAutoTopUp",
        "TopUpNow",
        "GetCharge",
    ],
    "billing.v1.UsageService": [
        "GetUsageSummary",
        "ListUsageRecords",
        "ListLedgerEntries",
        "ExportUsageCsv",
    ],
    "billing.v1.BudgetService": ["SetBudget", "GetBudget", "ListBudgets", "DeleteBudget"],
}


async def _run(*command: str, expect_exit: int = 0) -> str:
    """The tool's stdout, or its stderr when it is expected to fail (exit `expect_exit`)."""
    # The server runs in this event loop: the tool must run without blocking it.
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == expect_exit, f"{command}: {stderr.decode()}"
    return (stdout if expect_exit == 0 else stderr).decode()


async def grpcurl(
    client: Client, *args: str, data: dict[str, Any] | None = None, expect_exit: int = 0
) -> str:
    data_args = ("-d", json.dumps(data)) if data is not None else ()
    return await _run(
        tool("grpcurl"),
        "-plaintext",
        *data_args,
        f"127.0.0.1:{client.app.port}",
        *args,
        expect_exit=expect_exit,
    )


async def call(client: Client, method: str, data: dict[str, Any]) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(await grpcurl(client, method, data=data))
    return answer


async def test_grpcurl_lists_and_describes_every_service_and_method(client: Client) -> None:
    listed = set((await grpcurl(client, "list")).split())
    assert listed == {
        *METHODS,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    for service, methods in METHODS.items():
        assert set((await grpcurl(client, "list", service)).split()) == {
            f"{service}.{method}" for method in methods
        }
        for method in methods:
            described = await grpcurl(client, "describe", f"{service}.{method}")
            assert f"rpc {method} (" in described
    message = await grpcurl(client, "describe", "billing.v1.ReserveCreditRequest")
    assert "int64 amount_micros" in message


async def test_grpcurl_calls_every_method(client: Client) -> None:
    admin, billing = "billing.v1.AdminService", "billing.v1.BillingService"
    created = await call(
        client,
        f"{admin}/CreateTenant",
        {"request_id": str(uuid.uuid4()), "tenant_id": "acme", "payment_method_on_file": True},
    )
    assert created["tenant"]["credit_limit_micros"] == "25000000"
    updated = await call(
        client,
        f"{admin}/UpdateTenant",
        {"request_id": str(uuid.uuid4()), "tenant_id": "acme", "credit_limit_micros": 30_000_000},
    )
    assert updated["tenant"]["credit_limit_micros"] == "30000000"
    granted = await call(
        client,
        f"{admin}/GrantCredit",
        {
            "request_id": str(uuid.uuid4()),
            "tenant_id": "acme",
            "amount_micros": 1_000_000,
            "reason": "welcome",
        },
    )
    assert granted["balance"]["balance_micros"] == "1000000"
    checked = await call(client, f"{billing}/CheckAccess", {"tenant_id": "acme", "model": "gpt-4o"})
    assert checked["decision"]["allowed"] is True
    reserved = await call(
        client,
        f"{billing}/ReserveCredit",
        {
            "request_id": str(uuid.uuid4()),
            "tenant_id": "acme",
            "user_id": "u1",
            "model": "gpt-4o",
            "estimate": {"input_tokens": 1200, "max_output_tokens": 800},
            "ttl": "120s",
        },
    )
    reservation_id = reserved["reservation"]["reservation_id"]
    assert reserved["reservation"]["amount_micros"] == "11000"
    committed = await call(
        client,
        f"{billing}/Commit",
        {
            "request_id": str(uuid.uuid4()),
            "reservation_id": reservation_id,
            "usage": {"input_tokens": 1000, "output_tokens": 500},
        },
    )
    assert committed["usage_record"]["cost_micros"] == "7500"
    refunded = await call(
        client,
        f"{billing}/Refund",
        {
            "request_id": str(uuid.uuid4()),
            "reservation_id": reservation_id,
            "reason": "bad answer",
            "refund_all": True,
        },
    )
    assert refunded["kind"] == "REFUND_KIND_REFUND"
    assert refunded["amount_micros"] == "7500"
    tenant = await call(client, f"{admin}/GetTenant", {"tenant_id": "acme"})
    assert tenant["tenant"]["balance"]["balance_micros"] == "1000000"


async def test_grpcurl_decodes_error_details_through_reflection(client: Client) -> None:
    # grpcurl exits with 64 + the status code: 67 is INVALID_ARGUMENT.
    printed = await grpcurl(
        client,
        "billing.v1.BillingService/CheckAccess",
        data={"tenant_id": "", "model": "gpt-4o"},
        expect_exit=67,
    )
    details = [
        json.loads(line.split("\t", 1)[1])
        for line in printed.splitlines()
        if line.strip()[:2] in ("1)", "2)")
    ]
    assert details == [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "domain": "ai-billing",
            "reason": "FIELD_INVALID",
            "metadata": {"field": "tenant_id"},
        },
        {
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "field_violations": [{"field": "tenant_id", "description": "is required"}],
        },
    ]
    reasons = await grpcurl(client, "describe", "billing.v1.ErrorReason")
    assert "HOLD_EXPIRED = 8;" in reasons
    assert "string reason = 1;" in await grpcurl(client, "describe", "google.rpc.ErrorInfo")


async def test_grpcurl_health_check(client: Client) -> None:
    for service in ("", *METHODS):
        answer = await call(client, "grpc.health.v1.Health/Check", {"service": service})
        assert answer == {"status": "SERVING"}


async def test_buf_curl_calls_through_reflection(client: Client) -> None:
    answer = await _run(
        tool("buf"),
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "--data",
        json.dumps({"tenant_id": "someone", "model": "gpt-4o-mini"}),
        f"http://127.0.0.1:{client.app.port}/billing.v1.BillingService/CheckAccess",
    )
    decision = json.loads(answer)["decision"]
    assert decision["allowed"] is True
    assert decision["modelBilling"] == "MODEL_BILLING_INCLUDED"
