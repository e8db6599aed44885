"""Without a Stripe key the service runs as before; every AccountService method but
GetBillingProfile says Stripe is not configured. And AdminService.ListTenants: the billing
status filter and AIP-158 pages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
import pytest

from billing.v1 import account_pb2, account_pb2_grpc, admin_pb2, admin_pb2_grpc, types_pb2
from billing_service.app import Application
from billing_service.domain.payments import BillingStatus
from tests.payments.conftest import new_id, start_app
from tests.support.grpc_errors import rich_error


@dataclass
class Plain:
    app: Application
    admin: admin_pb2_grpc.AdminServiceStub
    account: account_pb2_grpc.AccountServiceStub


@pytest.fixture
async def plain(database_url: str) -> AsyncIterator[Plain]:
    app = await start_app(database_url, None)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        yield Plain(
            app,
            admin_pb2_grpc.AdminServiceStub(channel),
            account_pb2_grpc.AccountServiceStub(channel),
        )
    finally:
        await channel.close()
        await app.stop(grace_s=0)


async def _tenant(plain: Plain) -> str:
    tenant_id = new_id("tenant")
    await plain.admin.CreateTenant(
        admin_pb2.CreateTenantRequest(request_id=new_id("create"), tenant_id=tenant_id)
    )
    return tenant_id


async def test_card_rpcs_need_stripe(plain: Plain) -> None:
    tenant_id = await _tenant(plain)
    calls = [
        plain.account.CreateSetupIntent(
            account_pb2.CreateSetupIntentRequest(request_id=new_id("r"), tenant_id=tenant_id)
        ),
        plain.account.ConfirmPaymentMethod(
            account_pb2.ConfirmPaymentMethodRequest(
                request_id=new_id("r"), tenant_id=tenant_id, setup_intent_id="seti_123"
            )
        ),
        plain.account.RemovePaymentMethod(
            account_pb2.RemovePaymentMethodRequest(request_id=new_id("r"), tenant_id=tenant_id)
        ),
        plain.account.TopUpNow(
            account_pb2.TopUpNowRequest(
                request_id=new_id("r"), tenant_id=tenant_id, amount_micros=1_000_000
            )
        ),
        plain.account.UpdateAutoTopUp(
            account_pb2.UpdateAutoTopUpRequest(
                request_id=new_id("r"), tenant_id=tenant_id, threshold_micros=0
            )
        ),
        plain.account.GetCharge(
            account_pb2.GetChargeRequest(tenant_id=tenant_id, charge_id="chg_" + "0" * 32)
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        error = rich_error(raised.value)
        assert (error.code, error.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "STRIPE_NOT_CONFIGURED",
        )

    profile = await plain.account.GetBillingProfile(
        account_pb2.GetBillingProfileRequest(tenant_id=tenant_id)
    )
    assert profile.profile.billing_status == types_pb2.BILLING_STATUS_GOOD_STANDING
    assert not profile.profile.HasField("payment_method")
    assert profile.profile.auto_top_up.threshold_micros == 5_000_000
    assert plain.app.charge_worker is None


async def test_an_unknown_tenant_is_not_found_without_stripe(plain: Plain) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await plain.account.GetBillingProfile(
            account_pb2.GetBillingProfileRequest(tenant_id="nobody-" + new_id("t"))
        )
    assert rich_error(raised.value).reason == "TENANT_NOT_FOUND"


async def test_list_tenants_pages_through_a_billing_status(plain: Plain) -> None:
    tenants = sorted([await _tenant(plain) for _ in range(5)])
    assert plain.app.account is not None
    store = plain.app.account.store
    for tenant_id in tenants[1:4]:
        await store.set_billing_status(tenant_id, BillingStatus.PAYMENT_FAILED, datetime.now(UTC))

    seen: list[str] = []
    token = ""
    while True:
        page = await plain.admin.ListTenants(
            admin_pb2.ListTenantsRequest(
                billing_status=types_pb2.BILLING_STATUS_PAYMENT_FAILED,
                page_size=2,
                page_token=token,
            )
        )
        assert len(page.tenants) <= 2
        assert all(
            t.billing_status == types_pb2.BILLING_STATUS_PAYMENT_FAILED for t in page.tenants
        )
        seen += [t.tenant_id for t in page.tenants]
        token = page.next_page_token
        if not token:
            break
    assert seen == tenants[1:4]
    everyone = await plain.admin.ListTenants(admin_pb2.ListTenantsRequest())
    assert [t.tenant_id for t in everyone.tenants] == tenants

    first = await plain.admin.ListTenants(
        admin_pb2.ListTenantsRequest(
            billing_status=types_pb2.BILLING_STATUS_PAYMENT_FAILED, page_size=1
        )
    )
    for bad in (
        admin_pb2.ListTenantsRequest(page_token=first.next_page_token),  # another filter
        admin_pb2.ListTenantsRequest(page_token="not-a-token"),
        admin_pb2.ListTenantsRequest(page_size=1001),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await plain.admin.ListTenants(bad)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
