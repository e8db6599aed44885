"""The classes of bad input an outside catalogue found, one explicit case each (the generated
test in test_any_request.py covers them in general): each is INVALID_ARGUMENT naming its field,
leaks nothing and changes nothing."""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from billing.v1 import (
    account_pb2,
    account_pb2_grpc,
    admin_pb2,
    admin_pb2_grpc,
    billing_pb2,
    budget_pb2,
    budget_pb2_grpc,
    types_pb2,
    usage_pb2,
    usage_pb2_grpc,
)
from billing_service.app import Application
from billing_service.config import Settings
from tests.api.conftest import Client
from tests.api.test_any_request import LEAKS, database_rows
from tests.support.grpc_errors import rich_error
from tests.support.request_strategies import edited_tokens


def rid() -> str:
    return str(uuid.uuid4())


async def refused(
    client: Client, call: Awaitable[Any], field: str, code: grpc.StatusCode | None = None
) -> str:
    """Awaits `call`, which must fail with INVALID_ARGUMENT naming `field` (or `code`), leak
    nothing and change no table; returns the message."""
    before = await database_rows(client.app.engine)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    error = rich_error(raised.value)
    after = await database_rows(client.app.engine)
    assert before == after
    assert LEAKS.search(error.message) is None, error.message
    if code is not None:
        assert error.code == code, error
        return error.message
    assert (error.code, error.fields) == (grpc.StatusCode.INVALID_ARGUMENT, [field]), error
    assert error.message.startswith(f"{field}: "), error.message
    return error.message


async def seed(client: Client) -> list[str]:
    """Tenants with usage and budgets, so that every list has a second page."""
    tenants = ["acme", "globex", "initech"]
    for tenant_id in tenants:
        await client.admin.CreateTenant(
            admin_pb2.CreateTenantRequest(
                request_id=rid(), tenant_id=tenant_id, payment_method_on_file=True
            )
        )
    reservations = []
    for number in range(3):
        reserved = await client.billing.ReserveCredit(
            billing_pb2.ReserveCreditRequest(
                request_id=rid(),
                tenant_id="acme",
                user_id=f"user-{number}",
                model="gpt-4o",
                amount_micros=10_000,
            )
        )
        reservations.append(reserved.reservation.reservation_id)
        client.clock.advance(seconds=1)
        await client.billing.Commit(
            billing_pb2.CommitRequest(
                request_id=rid(),
                reservation_id=reserved.reservation.reservation_id,
                usage=types_pb2.TokenUsage(input_tokens=10, output_tokens=10),
            )
        )
    budgets = budget_pb2_grpc.BudgetServiceStub(client.channel)
    for scope_id in ("ann", "bob"):
        await budgets.SetBudget(
            budget_pb2.SetBudgetRequest(
                request_id=rid(),
                budget=types_pb2.Budget(
                    tenant_id="acme",
                    scope=types_pb2.BUDGET_SCOPE_USER,
                    scope_id=scope_id,
                    limit_micros=1_000_000,
                    period=types_pb2.BUDGET_PERIOD_MONTH,
                ),
            )
        )
    return reservations


Lister = Callable[[grpc.aio.Channel, str], Awaitable[str]]


async def list_tenants(channel: grpc.aio.Channel, token: str) -> str:
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    page = await admin.ListTenants(admin_pb2.ListTenantsRequest(page_size=1, page_token=token))
    return page.next_page_token


async def list_usage(channel: grpc.aio.Channel, token: str) -> str:
    usage = usage_pb2_grpc.UsageServiceStub(channel)
    page = await usage.ListUsageRecords(
        usage_pb2.ListUsageRecordsRequest(tenant_id="acme", page_size=1, page_token=token)
    )
    return page.next_page_token


async def list_ledger(channel: grpc.aio.Channel, token: str) -> str:
    usage = usage_pb2_grpc.UsageServiceStub(channel)
    page = await usage.ListLedgerEntries(
        usage_pb2.ListLedgerEntriesRequest(tenant_id="acme", page_size=1, page_token=token)
    )
    return page.next_page_token


async def list_budgets(channel: grpc.aio.Channel, token: str) -> str:
    budgets = budget_pb2_grpc.BudgetServiceStub(channel)
    page = await budgets.ListBudgets(
        budget_pb2.ListBudgetsRequest(tenant_id="acme", page_size=1, page_token=token)
    )
    return page.next_page_token


LISTERS = [list_tenants, list_usage, list_ledger, list_budgets]


def forged(token: str, position: object) -> str:
    """A token with the filters' fingerprint of `token` and a position of the forger's choice."""
    body = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    text = json.dumps({"f": body["f"], "p": position}, separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize("lister", LISTERS, ids=lambda lister: lister.__name__)
async def test_a_hand_edited_page_token_is_invalid_argument_page_token(
    client: Client, lister: Lister
) -> None:
    await seed(client)
    token = await lister(client.channel, "")
    assert token
    await lister(client.channel, token)
    for edited in edited_tokens(token):
        await refused(client, lister(client.channel, edited), "page_token")


@pytest.mark.parametrize(
    ("lister", "position"),
    [
        (list_tenants, ["acme"]),
        (list_ledger, [1]),
        (list_budgets, ["user", "ann"]),
        (list_usage, ["2026-01-01T00:00:00+00:00", "rsv_" + "0" * 32]),
    ],
    ids=lambda value: getattr(value, "__name__", ""),
)
async def test_a_well_formed_page_token_this_service_did_not_make_is_refused(
    client: Client, lister: Lister, position: object
) -> None:
    await seed(client)
    token = await lister(client.channel, "")
    await refused(client, lister(client.channel, forged(token, position)), "page_token")


async def test_replicas_sharing_a_database_accept_each_others_page_tokens(
    client: Client, database_url: str
) -> None:
    await seed(client)
    other = await Application.start(
        Settings(database_url=database_url, listen_address="127.0.0.1:0")
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{other.port}")
    try:
        for lister in LISTERS:
            token = await lister(client.channel, "")
            await lister(channel, token)
    finally:
        await channel.close()
        await other.stop(grace_s=0)


async def test_a_configured_page_token_secret_is_shared_and_tokens_of_another_are_refused(
    database_url: str,
) -> None:
    servers = [
        await Application.start(
            Settings(
                database_url=database_url,
                listen_address="127.0.0.1:0",
                page_token_secret=secret,  # type: ignore[call-arg]
            )
        )
        for secret in ("s" * 32, "s" * 32, "t" * 32)
    ]
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") for server in servers]
    try:
        admins = [admin_pb2_grpc.AdminServiceStub(channel) for channel in channels]
        for number in range(3):
            await admins[0].CreateTenant(
                admin_pb2.CreateTenantRequest(request_id=rid(), tenant_id=f"tenant-{number}")
            )
        first = await admins[0].ListTenants(admin_pb2.ListTenantsRequest(page_size=1))
        second = await admins[1].ListTenants(
            admin_pb2.ListTenantsRequest(page_size=1, page_token=first.next_page_token)
        )
        assert [tenant.tenant_id for tenant in second.tenants] == ["tenant-1"]
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await admins[2].ListTenants(
                admin_pb2.ListTenantsRequest(page_size=1, page_token=first.next_page_token)
            )
        assert rich_error(raised.value).fields == ["page_token"]
    finally:
        for channel in channels:
            await channel.close()
        for server in servers:
            await server.stop(grace_s=0)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x0a\x02\xff\xfe",  # tenant_id that is not UTF-8
        b"\x0a\x05acme",  # truncated: 5 bytes announced, 4 sent
        b"\x12\x81",  # a length that never ends
        b"\xff\xff\xff\xff",
    ],
)
async def test_bytes_that_are_not_protobuf_are_invalid_argument_naming_the_request(
    client: Client, payload: bytes
) -> None:
    check = client.channel.unary_unary(
        "/billing.v1.BillingService/CheckAccess",
        request_serializer=None,
        response_deserializer=None,
    )
    await refused(client, check(payload), "billing.v1.CheckAccessRequest")
    export = client.channel.unary_stream(
        "/billing.v1.UsageService/ExportUsageCsv",
        request_serializer=None,
        response_deserializer=None,
    )

    async def drain() -> None:
        async for _ in export(payload):
            pass

    await refused(client, drain(), "billing.v1.ExportUsageCsvRequest")


@pytest.mark.parametrize(
    "ttl",
    [
        Duration(seconds=2**63 - 1),
        Duration(seconds=-(2**63)),
        Duration(seconds=315_576_000_001),
        Duration(seconds=10, nanos=2_000_000_000),
        Duration(seconds=10, nanos=-1),
        Duration(seconds=-5),
        Duration(nanos=-(2**31)),
    ],
    ids=str,
)
async def test_a_ttl_out_of_range_is_invalid_argument_ttl(client: Client, ttl: Duration) -> None:
    request = billing_pb2.ReserveCreditRequest(
        request_id=rid(),
        tenant_id="acme",
        user_id="ann",
        model="gpt-4o",
        amount_micros=1000,
        ttl=ttl,
    )
    await refused(client, client.billing.ReserveCredit(request), "ttl")


@pytest.mark.parametrize(
    "stamp",
    [
        Timestamp(seconds=2**63 - 1),
        Timestamp(seconds=-(2**63)),
        Timestamp(seconds=253_402_300_800),
        Timestamp(seconds=0, nanos=-1),
        Timestamp(seconds=0, nanos=1_000_000_000),
    ],
    ids=str,
)
async def test_a_timestamp_out_of_range_is_invalid_argument_naming_it(
    client: Client, stamp: Timestamp
) -> None:
    usage = usage_pb2_grpc.UsageServiceStub(client.channel)
    await refused(
        client,
        usage.ListUsageRecords(
            usage_pb2.ListUsageRecordsRequest(tenant_id="acme", start_time=stamp)
        ),
        "start_time",
    )
    await refused(
        client,
        usage.GetUsageSummary(usage_pb2.GetUsageSummaryRequest(tenant_id="acme", end_time=stamp)),
        "end_time",
    )


async def test_a_summary_starting_in_december_9999_without_an_end_is_refused(
    client: Client,
) -> None:
    await seed(client)
    usage = usage_pb2_grpc.UsageServiceStub(client.channel)
    start = Timestamp(seconds=253_400_659_200)  # 9999-12-01T00:00:00Z
    await refused(
        client,
        usage.GetUsageSummary(usage_pb2.GetUsageSummaryRequest(tenant_id="acme", start_time=start)),
        "start_time",
    )


async def test_undefined_enum_numbers_are_invalid_argument_naming_the_field(
    client: Client,
) -> None:
    await seed(client)
    budgets = budget_pb2_grpc.BudgetServiceStub(client.channel)
    usage = usage_pb2_grpc.UsageServiceStub(client.channel)
    await refused(
        client,
        client.admin.CreateTenant(
            admin_pb2.CreateTenantRequest(request_id=rid(), tenant_id="hooli", status=99)  # type: ignore[arg-type]
        ),
        "status",
    )
    await refused(
        client,
        client.admin.UpdateTenant(
            admin_pb2.UpdateTenantRequest(request_id=rid(), tenant_id="acme", status=99)  # type: ignore[arg-type]
        ),
        "status",
    )
    await refused(
        client,
        client.admin.ListTenants(admin_pb2.ListTenantsRequest(billing_status=99)),  # type: ignore[arg-type]
        "billing_status",
    )
    await refused(
        client,
        budgets.ListBudgets(budget_pb2.ListBudgetsRequest(tenant_id="acme", scope=99)),  # type: ignore[arg-type]
        "scope",
    )
    await refused(
        client,
        budgets.GetBudget(budget_pb2.GetBudgetRequest(tenant_id="acme", scope=-1, scope_id="ann")),  # type: ignore[arg-type]
        "scope",
    )
    await refused(
        client,
        budgets.SetBudget(
            budget_pb2.SetBudgetRequest(
                request_id=rid(),
                budget=types_pb2.Budget(
                    tenant_id="acme",
                    scope=types_pb2.BUDGET_SCOPE_USER,
                    scope_id="cy",
                    limit_micros=1,
                    period=7,  # type: ignore[arg-type]
                ),
            )
        ),
        "budget.period",
    )
    for kinds in ([99], [0], [usage_pb2.LEDGER_ENTRY_KIND_DEBIT, 0]):
        await refused(
            client,
            usage.ListLedgerEntries(
                usage_pb2.ListLedgerEntriesRequest(tenant_id="acme", kinds=kinds)  # type: ignore[arg-type]
            ),
            "kinds",
        )


async def test_free_text_a_database_cannot_store_is_invalid_argument(client: Client) -> None:
    reservations = await seed(client)
    await refused(
        client,
        client.admin.GrantCredit(
            admin_pb2.GrantCreditRequest(
                request_id=rid(), tenant_id="acme", amount_micros=5, reason="goodwill\x00"
            )
        ),
        "reason",
    )
    await refused(
        client,
        client.billing.Refund(
            billing_pb2.RefundRequest(
                request_id=rid(), reservation_id=reservations[0], amount_micros=1, reason="\x00"
            )
        ),
        "reason",
    )


async def test_an_unexpected_failure_is_internal_and_leaks_nothing(
    client: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A defect no test found yet still answers without its exception's text, SQL or paths."""

    async def broken(tenant_id: str) -> None:
        quoted = "x" * 100_000  # an exception's text may quote a whole request
        raise RuntimeError(f'SELECT {quoted} FROM tenants -- File "/srv/app/core.py", line 1')

    monkeypatch.setattr(client.app.core, "get_tenant", broken)
    caplog.set_level(logging.ERROR, logger="billing_service.api.interceptors")
    message = await refused(
        client,
        client.admin.GetTenant(admin_pb2.GetTenantRequest(tenant_id="acme")),
        "",
        code=grpc.StatusCode.INTERNAL,
    )
    assert "SELECT" not in message
    assert "RuntimeError" not in message
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.admin.GetTenant(admin_pb2.GetTenantRequest(tenant_id="acme"))
    assert rich_error(raised.value).reason == "INTERNAL_ERROR"
    logged = [record.getMessage() for record in caplog.records]
    assert logged
    assert all("RuntimeError: SELECT" in line for line in logged)
    assert all(len(line) < 5000 for line in logged), "the log line quotes the whole request"


async def test_a_charge_id_is_chg_and_32_lowercase_hex_digits(client: Client) -> None:
    account = account_pb2_grpc.AccountServiceStub(client.channel)
    for charge_id in ("chg_" + "/" * 32, "chg_" + "A" * 32, "chg_" + "0" * 31 + "g"):
        await refused(
            client,
            account.GetCharge(account_pb2.GetChargeRequest(tenant_id="acme", charge_id=charge_id)),
            "charge_id",
        )
