"""The whole service on a real port with Stripe at localstripe (over HTTP) and the Stripe
webhook endpoint on a port of its own, fed by the payments core's sink as in production."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import stripe

from billing.v1 import (
    account_pb2,
    account_pb2_grpc,
    admin_pb2,
    admin_pb2_grpc,
    billing_pb2_grpc,
    usage_pb2_grpc,
)
from billing_service.app import Application
from billing_service.config import Settings
from billing_service.payments.webhooks import WEBHOOK_PATH
from billing_service.storage.audit import audit_ledger
from tests.payments.conftest import Payments, database_url, new_id  # noqa: F401 - sqlite/postgresql
from tests.support.localstripe import API_KEY
from tests.support.ports import free_port

SECRET = "whsec_e2e_" + "0123456789abcdef" * 2
WAIT_S = 30.0
METERED, INCLUDED = "gpt-4o", "gpt-4o-mini"
WEBHOOK_LOGGER = "billing_service.payments.webhooks"


def stripe_signature(body: bytes, secret: str = SECRET) -> str:
    """`Stripe-Signature` exactly as Stripe builds it: HMAC-SHA256 of "<t>.<body>"."""
    t = int(time.time())
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


@dataclass
class Stack(Payments):
    """`Payments` plus the usage dashboard and the webhook endpoint's address."""

    usage: usage_pb2_grpc.UsageServiceStub
    webhook_url: str
    target: str

    async def post_event(self, event: dict[str, Any]) -> httpx.Response:
        body = json.dumps(event).encode()
        async with httpx.AsyncClient(timeout=WAIT_S) as http:
            return await http.post(
                self.webhook_url,
                content=body,
                headers={
                    "Content-Type": "application/json; charset=utf-8",
                    "Stripe-Signature": stripe_signature(body),
                },
            )

    async def profile(self, tenant_id: str) -> account_pb2.BillingProfile:
        answer = await self.account.GetBillingProfile(
            account_pb2.GetBillingProfileRequest(tenant_id=tenant_id)
        )
        return answer.profile

    async def balance(self, tenant_id: str) -> admin_pb2.Balance:
        answer = await self.admin.GetTenant(admin_pb2.GetTenantRequest(tenant_id=tenant_id))
        return answer.tenant.balance

    async def top_up_now(self, tenant_id: str, amount_micros: int) -> account_pb2.Charge:
        answer = await self.account.TopUpNow(
            account_pb2.TopUpNowRequest(
                request_id=new_id("topup"), tenant_id=tenant_id, amount_micros=amount_micros
            ),
            timeout=WAIT_S,
        )
        return answer.charge


@contextlib.asynccontextmanager
async def serving(database: str, stripe_url: str, browser_url: str) -> AsyncIterator[Stack]:
    """The server with its Stripe calls going to `stripe_url` (localstripe or a proxy in front
    of it) and the test's browser talking to `browser_url` (localstripe)."""
    webhook_port = free_port()
    settings = Settings(
        database_url=database,
        listen_address="127.0.0.1:0",
        stripe_api_key=API_KEY,  # type: ignore[arg-type]
        stripe_api_base=stripe_url,
        webhook_port=webhook_port,
        stripe_webhook_secret=SECRET,  # type: ignore[arg-type]
        # Worker rounds run when a test (or low credit) asks, not on a timer.
        charge_worker_interval_s=3600,
    )
    app = await Application.start(settings)
    target = f"127.0.0.1:{app.port}"
    channel = grpc.aio.insecure_channel(target)
    try:
        yield Stack(
            app,
            stripe.StripeClient(API_KEY, base_addresses={"api": browser_url}),
            billing_pb2_grpc.BillingServiceStub(channel),
            admin_pb2_grpc.AdminServiceStub(channel),
            account_pb2_grpc.AccountServiceStub(channel),
            usage_pb2_grpc.UsageServiceStub(channel),
            f"http://127.0.0.1:{webhook_port}{WEBHOOK_PATH}",
            target,
        )
        assert await audit_ledger(app.engine, check_exposure=False) == []
    finally:
        await channel.close()
        await app.stop(grace_s=0)


class LogLine(logging.Handler):
    """Set once a record of `logger` containing `text` is emitted (from any thread)."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self._loop = asyncio.get_running_loop()
        self._seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self._loop.call_soon_threadsafe(self._seen.set)

    async def wait(self, timeout_s: float = WAIT_S) -> None:
        async with asyncio.timeout(timeout_s):
            await self._seen.wait()


@contextlib.contextmanager
def watching(logger_name: str, text: str) -> Iterator[LogLine]:
    logger = logging.getLogger(logger_name)
    line = LogLine(text)
    previous = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(line)
    try:
        yield line
    finally:
        logger.removeHandler(line)
        logger.setLevel(previous)
