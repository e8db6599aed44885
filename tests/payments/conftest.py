"""A real server on a real port with Stripe at localstripe (over HTTP), on SQLite and
PostgreSQL, and the helpers a tenant admin's browser would run (Stripe.js's part)."""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import stripe

from billing.v1 import account_pb2, account_pb2_grpc, admin_pb2, admin_pb2_grpc, billing_pb2_grpc
from billing_service.app import Application
from billing_service.config import Settings
from billing_service.core import Clock, utc_now
from billing_service.domain.payments import Charge
from billing_service.storage.audit import audit_ledger
from tests.support.localstripe import API_KEY, LocalStripe
from tests.support.postgres import PostgresServer

_numbers = itertools.count()

CARD_OK = "4242424242424242"
CARD_DECLINED_OFF_SESSION = "4000000000000341"
CARD_DECLINED = "4000000000000002"
CARD_NEEDS_AUTHENTICATION = "4000002500003155"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database(f"payments_{next(_numbers)}")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@dataclass
class Payments:
    app: Application
    stripe: stripe.StripeClient
    billing: billing_pb2_grpc.BillingServiceStub
    admin: admin_pb2_grpc.AdminServiceStub
    account: account_pb2_grpc.AccountServiceStub

    async def create_tenant(self, credit_limit_micros: int = 25_000_000) -> str:
        tenant_id = new_id("tenant")
        await self.admin.CreateTenant(
            admin_pb2.CreateTenantRequest(
                request_id=new_id("create"),
                tenant_id=tenant_id,
                credit_limit_micros=credit_limit_micros,
            )
        )
        return tenant_id

    async def start_setup(self, tenant_id: str) -> account_pb2.CreateSetupIntentResponse:
        return await self.account.CreateSetupIntent(
            account_pb2.CreateSetupIntentRequest(request_id=new_id("setup"), tenant_id=tenant_id)
        )

    def confirm_in_browser(self, setup_intent_id: str, card_number: str) -> None:
        """What Stripe.js does on the billing page: a PaymentMethod from the card, then the
        SetupIntent confirmed with it. Raises stripe.CardError when the card is refused."""
        method = self.stripe.v1.payment_methods.create(
            {
                "type": "card",
                "card": {"number": card_number, "exp_month": 12, "exp_year": 2034, "cvc": "123"},
            }
        )
        intent = self.stripe.v1.setup_intents.confirm(
            setup_intent_id, {"payment_method": method.id}
        )
        if intent.status == "requires_action":
            # The card holder completes 3-D Secure; localstripe takes a second confirm as that.
            self.stripe.v1.setup_intents.confirm(setup_intent_id)

    async def save_card(self, tenant_id: str, card_number: str) -> account_pb2.BillingProfile:
        started = await self.start_setup(tenant_id)
        self.confirm_in_browser(started.setup_intent_id, card_number)
        answer = await self.account.ConfirmPaymentMethod(
            account_pb2.ConfirmPaymentMethodRequest(
                request_id=new_id("confirm"),
                tenant_id=tenant_id,
                setup_intent_id=started.setup_intent_id,
            )
        )
        return answer.profile

    async def charges(self, tenant_id: str) -> list[Charge]:
        assert self.app.account is not None
        return await self.app.account.store.charges_of(tenant_id)

    async def settle_top_ups(self, tenant_id: str) -> Charge:
        """Runs a worker round and waits until the tenant's latest charge has an outcome."""
        worker = self.app.charge_worker
        assert worker is not None
        await worker.run_once()
        charges = await self.charges(tenant_id)
        assert charges, "no charge was enqueued"
        settled = await worker.wait_until_settled(charges[-1].charge_id, 30.0)
        assert settled is not None
        return settled


async def start_app(
    database_url: str, stripe_url: str | None, clock: Clock = utc_now, **overrides: Any
) -> Application:
    stripe_settings = {}
    if stripe_url is not None:
        stripe_settings = {"stripe_api_key": API_KEY, "stripe_api_base": stripe_url}
    settings = Settings(
        database_url=database_url,
        listen_address="127.0.0.1:0",
        # Worker rounds run when a test (or low credit) asks, not on a timer.
        charge_worker_interval_s=3600,
        **stripe_settings,  # type: ignore[arg-type]
        **overrides,
    )
    return await Application.start(settings, clock=clock)


@pytest.fixture
async def payments(database_url: str, localstripe: LocalStripe) -> AsyncIterator[Payments]:
    async with serving(database_url, localstripe.url, localstripe) as payments:
        yield payments


@contextlib.asynccontextmanager
async def serving(
    database_url: str,
    stripe_url: str,
    localstripe: LocalStripe,
    clock: Clock = utc_now,
    **settings: Any,
) -> AsyncIterator[Payments]:
    """The server with Stripe at `stripe_url`; the test's browser talks to localstripe."""
    app = await start_app(database_url, stripe_url, clock, **settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        yield Payments(
            app,
            stripe.StripeClient(API_KEY, base_addresses={"api": localstripe.url}),
            billing_pb2_grpc.BillingServiceStub(channel),
            admin_pb2_grpc.AdminServiceStub(channel),
            account_pb2_grpc.AccountServiceStub(channel),
        )
        assert await audit_ledger(app.engine, check_exposure=False) == []
    finally:
        await channel.close()
        await app.stop(grace_s=0)
