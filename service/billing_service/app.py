"""Wiring: settings -> engine, ledger store, core -> gRPC server with health, reflection, the
call guard (auth, deadlines, metrics, logs), readiness, metrics and tracing; and the drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2_grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.v1 import (
    account_pb2,
    account_pb2_grpc,
    admin_pb2,
    admin_pb2_grpc,
    billing_pb2,
    billing_pb2_grpc,
    budget_pb2,
    budget_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)
from billing_service.api.account_servicer import AccountServicer, BillingProfileMessages
from billing_service.api.budget_servicer import BudgetServicer
from billing_service.api.interceptors import CallGuard
from billing_service.api.reflection import enable_reflection
from billing_service.api.servicers import AdminServicer, BillingServicer
from billing_service.api.transport import exposure_warning, listen, server_options
from billing_service.api.usage_servicer import UsageServicer
from billing_service.budget_core import BudgetCore
from billing_service.config import Settings, load_price_table
from billing_service.core import BillingCore, Clock, utc_now
from billing_service.domain.errors import Unavailable
from billing_service.domain.page_tokens import PageTokens
from billing_service.domain.payments import AutoTopUp
from billing_service.metrics import Metrics, MetricsServer
from billing_service.open_holds import OpenHoldListing
from billing_service.payments.account import AccountCore, Payments
from billing_service.payments.events import StripeEventSink
from billing_service.payments.outbox import ChargeOutcomes, ChargeWorker, OnDemandTopUp
from billing_service.payments.reconcile import CardReconciler
from billing_service.payments.resolution import ChargeResolution
from billing_service.payments.sink import PaymentsEventSink
from billing_service.readiness import Readiness
from billing_service.security import load_authenticator, server_credentials
from billing_service.storage.budget_store import BudgetStore
from billing_service.storage.database import create_engine
from billing_service.storage.ledger_store import LedgerStore
from billing_service.storage.migrations import migrate
from billing_service.storage.open_holds import OpenHoldStore

if TYPE_CHECKING:
    from billing_service.payments.webhooks import WebhookServer
from billing_service.storage.payments_store import PaymentsStore
from billing_service.storage.signing_keys import PAGE_TOKENS, stored_key
from billing_service.storage.usage_store import UsageStore
from billing_service.tracing import Tracing, start_tracing
from billing_service.usage import UsageDashboard

_log = logging.getLogger(__name__)

SERVICE_NAMES = (
    billing_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    account_pb2.DESCRIPTOR.services_by_name["AccountService"].full_name,
    usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
    budget_pb2.DESCRIPTOR.services_by_name["BudgetService"].full_name,
)

# Releases at most this many expired holds per sweep transaction batch.
_SWEEP_BATCH = 500


@dataclass
class Application:
    """A running server: call `stop()` to drain it."""

    settings: Settings
    engine: AsyncEngine
    core: BillingCore
    server: grpc.aio.Server
    health: health_aio.HealthServicer
    port: int
    metrics: Metrics
    readiness: Readiness
    # The plaintext health-only listener (BILLING_HEALTH_LISTEN_ADDRESS), for kubelet probes.
    health_server: grpc.aio.Server | None
    health_port: int | None
    metrics_server: MetricsServer | None
    # The Stripe webhook endpoint (BILLING_WEBHOOK_PORT); None when off.
    webhook_server: WebhookServer | None
    _guard: CallGuard
    _tracing: Tracing | None
    _sweeper: asyncio.Task[None]
    _stopping: asyncio.Event
    # Card payments: the webhook endpoint hands Stripe's facts to `payments_sink`.
    account: AccountCore | None = None
    payments_sink: StripeEventSink | None = None
    charge_worker: ChargeWorker | None = None
    _payment_tasks: tuple[asyncio.Task[None], ...] = ()

    @classmethod
    async def start(
        cls,
        settings: Settings,
        clock: Clock = utc_now,
        interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
        stripe_event_sink: StripeEventSink | None = None,
    ) -> Application:
        """Serves until `stop()`. `interceptors` run before the built-in ones (tests use it).

        `stripe_event_sink` receives what the webhook endpoint learns from Stripe; by default
        the payments core's own sink.
        """
        prices = load_price_table(settings.price_table)
        authenticator = load_authenticator(settings)
        credentials = server_credentials(settings)
        if settings.migrate_on_start:
            await migrate(settings.database_url)
        engine = create_engine(settings.database_url, pool_size=settings.db_pool_size)
        async with contextlib.AsyncExitStack() as on_failure:
            on_failure.push_async_callback(engine.dispose)
            tracing = start_tracing(settings.tracing)
            if tracing is not None:
                on_failure.callback(tracing.shutdown)
            metrics = Metrics()
            metrics.watch_pool(engine)
            core = BillingCore(
                LedgerStore(engine, coalesce=settings.db_coalesce_writes),
                prices,
                settings.core_settings(),
                clock,
            )
            page_tokens = page_tokens_for(settings, engine)
            account, worker = payments_for(settings, engine, core, clock, page_tokens, metrics)
            guard = CallGuard(authenticator, metrics, access_log=settings.access_log)
            chain = [*interceptors, *([tracing.interceptor] if tracing else []), guard]
            server = grpc.aio.server(interceptors=chain, options=server_options(settings))
            billing_pb2_grpc.add_BillingServiceServicer_to_server(BillingServicer(core), server)
            resolution = ChargeResolution(
                account.store,
                None if worker is None else account.gateway,
                clock,
                page_tokens,
                metrics,
            )
            admin_pb2_grpc.add_AdminServiceServicer_to_server(
                AdminServicer(
                    core,
                    account,
                    resolution,
                    OpenHoldListing(OpenHoldStore(engine), page_tokens),
                ),
                server,
            )
            account_pb2_grpc.add_AccountServiceServicer_to_server(AccountServicer(account), server)
            dashboard = UsageDashboard[account_pb2.BillingProfile](
                UsageStore(engine),
                clock,
                billing_profiles=BillingProfileMessages(account),
                budgets=BudgetStore(engine),
                page_tokens=page_tokens,
            )
            usage_pb2_grpc.add_UsageServiceServicer_to_server(UsageServicer(dashboard), server)
            budget_pb2_grpc.add_BudgetServiceServicer_to_server(
                BudgetServicer(BudgetCore(BudgetStore(engine), clock, page_tokens)), server
            )
            health_servicer = health_aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            if settings.reflection:
                enable_reflection(server, (*SERVICE_NAMES, health.SERVICE_NAME))
            port = listen(server, settings.listen_address, credentials)
            on_failure.push_async_callback(server.stop, None)
            health_server, health_port = None, None
            if settings.health_listen_address:
                health_server = grpc.aio.server(options=server_options(settings))
                health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
                health_port = listen(health_server, settings.health_listen_address, None)
                on_failure.push_async_callback(health_server.stop, None)
            metrics_server = None
            if settings.metrics_port:
                metrics_server = metrics.serve(settings.metrics_host, settings.metrics_port)
                on_failure.callback(metrics_server.stop)
            payments_sink = PaymentsEventSink(account.store, account, worker, clock, metrics)
            webhook_server = None
            if settings.webhook_port:
                # The Stripe SDK and aiohttp are imported only when they are used: a fifth of
                # the start-up's imports otherwise.
                from billing_service.payments.webhooks import start_webhook_server

                webhook_server = await start_webhook_server(
                    settings, stripe_event_sink or payments_sink, engine, clock, metrics
                )
            if webhook_server is not None:
                on_failure.push_async_callback(webhook_server.stop)
            readiness = Readiness(
                engine,
                health_servicer,
                SERVICE_NAMES,
                metrics,
                interval_s=settings.health_check_interval_s,
                timeout_s=settings.health_check_timeout_s,
                database_url=settings.database_url,
            )
            await readiness.check()
            await server.start()
            if health_server is not None:
                await health_server.start()
            if warning := exposure_warning(settings.listen_address, authenticator.enabled):
                _log.warning(warning)
            stopping = asyncio.Event()
            sweeper = asyncio.create_task(
                _sweep_expired_holds(core, metrics, settings.expiry_sweep_interval_s, stopping),
                name="expiry-sweeper",
            )
            payment_tasks = _start_payment_tasks(settings, account, worker, stopping)
            readiness.start()
            on_failure.pop_all()
        if health_server is not None:
            health_address = settings.health_listen_address
            _log.info("serving grpc.health.v1 on %s (port %d)", health_address, health_port)
        if metrics_server is not None:
            host, metrics_port = settings.metrics_host, metrics_server.port
            _log.info("serving metrics on http://%s:%d/metrics", host, metrics_port)
        _log.info("serving billing.v1 on %s (port %d)", settings.listen_address, port)
        return cls(
            settings,
            engine,
            core,
            server,
            health_servicer,
            port,
            metrics,
            readiness,
            health_server,
            health_port,
            metrics_server,
            webhook_server,
            guard,
            tracing,
            sweeper,
            stopping,
            account=account,
            payments_sink=payments_sink,
            charge_worker=worker,
            _payment_tasks=payment_tasks,
        )

    async def stop(self, grace_s: float | None = None) -> None:
        """Drains: readiness NOT_SERVING, in-flight calls finish within the grace period (new
        ones are refused), background work stops, then everything closes."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        await self.readiness.drain()
        _log.info(
            "draining: %d calls in flight, grace %.1fs",
            self._guard.in_flight,
            grace,
            extra={"in_flight": self._guard.in_flight, "grace_s": grace},
        )
        # Stripe redelivers whatever the webhook endpoint did not acknowledge before it closed.
        stops = [self.server.stop(grace)]
        if self.webhook_server is not None:
            stops.append(self.webhook_server.stop())
        await asyncio.gather(*stops)
        try:
            await asyncio.wait_for(self._sweeper, timeout=max(grace, 1.0))
        except TimeoutError:
            _log.warning("the expiry sweeper did not stop in time; its transaction is rolled back")
        for task in self._payment_tasks:
            try:
                await asyncio.wait_for(task, timeout=max(grace, 1.0))
            except TimeoutError:
                _log.warning(
                    "%s did not stop in time; its charge is retried later", task.get_name()
                )
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self._tracing is not None:
            self._tracing.shutdown()
        await self.engine.dispose()
        _log.info("stopped")


async def _sweep_expired_holds(
    core: BillingCore, metrics: Metrics, interval_s: float, stopping: asyncio.Event
) -> None:
    while not stopping.is_set():
        try:
            while not stopping.is_set():
                released = await core.release_expired(_SWEEP_BATCH)
                metrics.holds_expired.inc(released)
                if released < _SWEEP_BATCH:
                    break
        except Unavailable as error:
            _log.warning("releasing expired holds failed, will retry: %s", error.__cause__)
        except Exception:
            _log.exception("releasing expired holds failed, will retry")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval_s):
                await stopping.wait()


def page_tokens_for(settings: Settings, engine: AsyncEngine) -> PageTokens:
    """Page tokens signed with the configured key, or else with the key the migrations stored
    in the database: every replica of one database accepts every other's tokens without any
    configuration. Read on the first list call, so the server starts before its database."""
    configured = settings.page_token_key()
    if configured is not None:
        return PageTokens(configured)

    async def stored() -> bytes:
        return await stored_key(engine, PAGE_TOKENS)

    return PageTokens(stored)


def payments_for(
    settings: Settings,
    engine: AsyncEngine,
    core: BillingCore,
    clock: Clock,
    page_tokens: PageTokens,
    outcomes: ChargeOutcomes | None = None,
) -> tuple[AccountCore, ChargeWorker | None]:
    """The account use cases; with a Stripe key also the charge worker and on-demand top-ups."""
    defaults = AutoTopUp(
        True,
        settings.auto_top_up_threshold_micros,
        settings.auto_top_up_amount_micros,
        settings.auto_top_up_monthly_limit_micros,
    )
    store = PaymentsStore(engine, defaults, settings.stripe_currency)
    key = settings.stripe_key()
    if not key:
        return AccountCore(store, None, clock, page_tokens), None
    from billing_service.payments.stripe_gateway import StripeGateway

    gateway = StripeGateway(
        key,
        api_base=settings.stripe_api_base,
        currency=settings.stripe_currency,
        requests_per_second=settings.stripe_requests_per_second,
    )
    worker = ChargeWorker(
        store,
        gateway,
        clock,
        poll_interval_s=settings.charge_worker_interval_s,
        lease=timedelta(seconds=settings.charge_lease_s),
        concurrency=settings.charge_worker_concurrency,
        currency=settings.stripe_currency,
        outcomes=outcomes,
    )
    if settings.on_demand_top_up:
        core.top_up = OnDemandTopUp(store, worker, clock)
    return AccountCore(store, Payments(gateway, worker), clock, page_tokens), worker


def _start_payment_tasks(
    settings: Settings,
    account: AccountCore,
    worker: ChargeWorker | None,
    stopping: asyncio.Event,
) -> tuple[asyncio.Task[None], ...]:
    if worker is None:
        return ()
    reconciler = CardReconciler(account.store, account.gateway)
    return (
        asyncio.create_task(worker.run(stopping), name="charge-worker"),
        asyncio.create_task(
            reconciler.run(settings.reconcile_interval_s, stopping), name="card-reconciler"
        ),
    )


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then drains gracefully."""
    app = await Application.start(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await app.stop()
