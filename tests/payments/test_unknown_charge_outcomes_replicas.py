"""The matrix of test_unknown_charge_outcomes.py on replicas: `billing-service serve` processes
sharing one PostgreSQL, servers killed with SIGKILL between the steps, every cell a tenant of
its own (the proxy's faults are per customer); then one tenant's hanging calls beside the
others' top-ups on two replicas, measured in the same run.

1. Servers A and B. Each cell's tenant gets automatic top-ups ($5, a $10 monthly ceiling,
   always due) and its fault; its first charge reaches Stripe and no answer comes.
2. A is killed. Through B: a new card, the card removed, the tenant suspended.
3. B is killed. With no server up, the key-expired cells' charges are made a day old (the
   time of their first request moved back 21 hours: a server process's clock cannot be
   injected) and the proxy forgets their keys; every fault is lifted.
4. Servers C and D learn every outcome; C is killed once the first is learned.
5. The books of every cell are checked against localstripe.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import grpc
import pytest
import stripe
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.v1 import account_pb2, account_pb2_grpc, admin_pb2, admin_pb2_grpc
from billing_service.storage.database import create_engine
from billing_service.storage.migrations import migrate
from billing_service.storage.tables import charges
from tests.payments.charge_books import charge_problems, charge_rows
from tests.payments.conftest import CARD_OK, Payments, new_id
from tests.payments.test_unknown_charge_outcomes import (
    CHANGES,
    FAULTS,
    HANG_S,
    INTENTS,
    inject,
    timed_top_ups,
)
from tests.support.localstripe import API_KEY, LocalStripe
from tests.support.postgres import PostgresServer
from tests.support.server_process import ServerProcess
from tests.support.stripe_proxy import StripeFaultProxy

pytestmark = pytest.mark.slow

TOP_UP = 5_000_000
CEILING = 10_000_000
WAIT_S = 120.0
# Cells whose first charge is the only one: no card, or no longer an active tenant.
_ONE_CHARGE = ("card_removed", "tenant_suspended")
_databases = itertools.count()


@dataclass
class Cell:
    fault: str
    change: str
    tenant_id: str = ""
    customer_id: str = ""

    def __str__(self) -> str:
        return f"{self.fault} x {self.change}"


class Replicas:
    """Server processes on one database, started and killed as the steps say."""

    def __init__(self, database_url: str, proxy: StripeFaultProxy) -> None:
        self.settings = {
            "BILLING_DATABASE_URL": database_url,
            "BILLING_LISTEN_ADDRESS": "127.0.0.1:0",
            "BILLING_STRIPE_API_KEY": API_KEY,
            "BILLING_STRIPE_API_BASE": proxy.url,
            # A Stripe call gives up after 2 s; a hang outlasts it.
            "BILLING_CHARGE_LEASE_S": "4",
            "BILLING_CHARGE_WORKER_INTERVAL_S": "0.3",
            "BILLING_ON_DEMAND_TOP_UP": "false",
            "BILLING_LOG_FORMAT": "text",
        }
        self.running: list[ServerProcess] = []

    async def start(self) -> ServerProcess:
        server = await asyncio.to_thread(ServerProcess, self.settings)
        self.running.append(server)
        return server

    async def kill(self, server: ServerProcess) -> None:
        server.send_signal(signal.SIGKILL)
        await asyncio.to_thread(server.process.wait, 30)
        self.running.remove(server)

    def close(self) -> None:
        for server in self.running:
            server.kill()


@contextlib.asynccontextmanager
async def talking_to(server: ServerProcess, browser_url: str) -> AsyncIterator[Payments]:
    """The calls a product backend makes to one server, and a tenant admin's browser to
    Stripe (localstripe at `browser_url`)."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield Payments(
            None,  # type: ignore[arg-type]  # no Application in this process
            stripe.StripeClient(API_KEY, base_addresses={"api": browser_url}),
            None,  # type: ignore[arg-type]
            admin_pb2_grpc.AdminServiceStub(channel),
            account_pb2_grpc.AccountServiceStub(channel),
        )


@pytest.fixture
def proxy(localstripe: LocalStripe) -> Iterator[StripeFaultProxy]:
    with StripeFaultProxy(localstripe.url) as proxy:
        yield proxy


async def auto_top_up(payments: Payments, tenant_id: str, *, enabled: bool) -> None:
    await payments.account.UpdateAutoTopUp(
        account_pb2.UpdateAutoTopUpRequest(
            request_id=new_id("auto"),
            tenant_id=tenant_id,
            enabled=enabled,
            threshold_micros=50_000_000,
            amount_micros=TOP_UP,
            monthly_limit_micros=CEILING,
        )
    )


async def set_up(payments: Payments, cell: Cell, proxy: StripeFaultProxy) -> None:
    """$1 of credit and a good card; the fault in place before top-ups are turned on."""
    cell.tenant_id = await payments.create_tenant(credit_limit_micros=1_000_000)
    await auto_top_up(payments, cell.tenant_id, enabled=False)
    cell.customer_id = (await payments.save_card(cell.tenant_id, CARD_OK)).stripe_customer_id
    inject(proxy, cell.fault, cell.customer_id)
    await auto_top_up(payments, cell.tenant_id, enabled=True)


async def make_change(payments: Payments, cell: Cell) -> None:
    if cell.change == "card_changed":
        await payments.save_card(cell.tenant_id, CARD_OK)
    elif cell.change == "card_removed":
        await payments.account.RemovePaymentMethod(
            account_pb2.RemovePaymentMethodRequest(
                request_id=new_id("remove"), tenant_id=cell.tenant_id
            )
        )
    elif cell.change == "tenant_suspended":
        await payments.admin.UpdateTenant(
            admin_pb2.UpdateTenantRequest(
                request_id=new_id("suspend"),
                tenant_id=cell.tenant_id,
                status=admin_pb2.TENANT_STATUS_SUSPENDED,
            )
        )


async def a_day_passes(engine: AsyncEngine, proxy: StripeFaultProxy, cell: Cell) -> None:
    async with engine.begin() as conn:
        sent = await conn.execute(
            select(charges.c.charge_id, charges.c.sent_at).where(
                charges.c.tenant_id == cell.tenant_id, charges.c.sent_at.is_not(None)
            )
        )
        for charge_id, sent_at in list(sent):
            await conn.execute(
                update(charges)
                .where(charges.c.charge_id == charge_id)
                .values(sent_at=sent_at - timedelta(hours=21))
            )
    proxy.forget_keys(customer=cell.customer_id)


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Re-reads the database until `condition` holds; fails after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S} s: {what}")
        await asyncio.sleep(0.2)  # a bounded re-read of another process's progress


def expected_successes(cell: Cell) -> int:
    return 1 if cell.change in _ONE_CHARGE else 2


async def test_every_fault_and_change_on_two_replicas_killed_between_steps(
    postgres_server: PostgresServer, localstripe: LocalStripe, proxy: StripeFaultProxy
) -> None:
    url = postgres_server.create_database(f"replicas_{next(_databases)}")
    await migrate(url)
    engine = create_engine(url, pool_size=2)
    replicas = Replicas(url, proxy)
    cells = [Cell(fault, change) for fault in FAULTS for change in CHANGES]

    async def settled(cell: Cell) -> int:
        rows = await charge_rows(engine, cell.tenant_id)
        if any(row.status in ("pending", "unresolved") for row in rows):
            return -1
        return sum(row.status == "succeeded" for row in rows)

    try:
        first, second = await replicas.start(), await replicas.start()
        async with talking_to(first, localstripe.url) as payments:
            for cell in cells:
                await set_up(payments, cell, proxy)
        for cell in cells:
            await proxy.async_wait_until_forwarded(
                INTENTS, "POST", 1, WAIT_S, customer=cell.customer_id
            )
        await replicas.kill(first)
        async with talking_to(second, localstripe.url) as payments:
            for cell in cells:
                await make_change(payments, cell)
        await replicas.kill(second)
        for cell in cells:
            assert await settled(cell) == -1, f"{cell}: resolved before its faults were lifted"
            if cell.change == "key_expired":
                await a_day_passes(engine, proxy, cell)
        proxy.clear_faults()

        third, fourth = await replicas.start(), await replicas.start()

        async def any_learned() -> bool:
            return any([await settled(cell) > 0 for cell in cells])

        await until(any_learned, "a first outcome learned")
        await replicas.kill(third)

        async def all_learned() -> bool:
            return all([await settled(cell) == expected_successes(cell) for cell in cells])

        await until(all_learned, "every cell's charges settled")
        problems = {
            str(cell): await charge_problems(
                engine, localstripe.url, cell.tenant_id, cell.customer_id, CEILING
            )
            for cell in cells
        }
        assert fourth in replicas.running
    finally:
        replicas.close()
        await engine.dispose()

    assert {cell: found for cell, found in problems.items() if found} == {}


async def test_one_tenants_hanging_charges_do_not_delay_the_others_on_two_replicas(
    postgres_server: PostgresServer, localstripe: LocalStripe, proxy: StripeFaultProxy
) -> None:
    url = postgres_server.create_database(f"replicas_{next(_databases)}")
    await migrate(url)
    replicas = Replicas(url, proxy)
    try:
        servers = [await replicas.start(), await replicas.start()]
        async with (
            talking_to(servers[0], localstripe.url) as one,
            talking_to(servers[1], localstripe.url) as other,
        ):
            both = [one, other]
            tenants = []
            for _ in range(7):
                tenant_id = await one.create_tenant()
                await auto_top_up(one, tenant_id, enabled=False)
                await one.save_card(tenant_id, CARD_OK)
                tenants.append(tenant_id)
            stuck, others = tenants[0], tenants[1:]
            stuck_customer = (
                await one.account.GetBillingProfile(
                    account_pb2.GetBillingProfileRequest(tenant_id=stuck)
                )
            ).profile.stripe_customer_id
            await timed_top_ups(both, others)  # connections and caches warm
            before = await timed_top_ups(both, others)

            proxy.hang(HANG_S, "POST", INTENTS, times=1000, customer=stuck_customer)
            stalled = asyncio.create_task(timed_top_ups(both, [stuck]))
            await proxy.async_wait_until_forwarded(
                INTENTS, "POST", 1, WAIT_S, customer=stuck_customer
            )
            during = await timed_top_ups(both, others)
            await stalled
            proxy.clear_faults()
    finally:
        replicas.close()

    succeeded = account_pb2.CHARGE_STATUS_SUCCEEDED
    granted = (
        sum(status == succeeded for status, _ in before),
        sum(status == succeeded for status, _ in during),
    )
    assert granted == (len(others), len(others))
    slowdown = statistics.median(s for _, s in during) / statistics.median(s for _, s in before)
    # Two replicas on shared cores: the others' charges run beside the hanging one.
    assert slowdown < 3, f"the others' top-ups took {slowdown:.1f} times as long"
