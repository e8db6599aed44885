"""Wiring: settings -> engine, ledger store, core -> gRPC server with health and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.v1 import admin_pb2, admin_pb2_grpc, billing_pb2, billing_pb2_grpc
from billing_service.api.reflection import enable_reflection
from billing_service.api.servicers import AdminServicer, BillingServicer
from billing_service.config import Settings, load_price_table
from billing_service.core import BillingCore, Clock, utc_now
from billing_service.domain.errors import Unavailable
from billing_service.storage.database import create_engine
from billing_service.storage.ledger_store import LedgerStore
from billing_service.storage.migrations import migrate

_log = logging.getLogger(__name__)

SERVICE_NAMES = (
    billing_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
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
    _sweeper: asyncio.Task[None]

    @classmethod
    async def start(cls, settings: Settings, clock: Clock = utc_now) -> Application:
        prices = load_price_table(settings.price_table)
        if settings.migrate_on_start:
            await migrate(settings.database_url)
        engine = create_engine(settings.database_url, pool_size=settings.db_pool_size)
        core = BillingCore(LedgerStore(engine), prices, settings.core_settings(), clock)
        server = grpc.aio.server()
        billing_pb2_grpc.add_BillingServiceServicer_to_server(BillingServicer(core), server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(core), server)
        health_servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        if settings.reflection:
            enable_reflection(server, (*SERVICE_NAMES, health.SERVICE_NAME))
        port = server.add_insecure_port(settings.listen_address)
        if port == 0:
            await engine.dispose()
            raise OSError(f"cannot listen on {settings.listen_address}")
        await server.start()
        for name in ("", *SERVICE_NAMES):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        sweeper = asyncio.create_task(_sweep_expired_holds(core, settings.expiry_sweep_interval_s))
        _log.info("serving billing.v1 on %s (port %d)", settings.listen_address, port)
        return cls(settings, engine, core, server, health_servicer, port, sweeper)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stops taking calls, lets in-flight ones finish within the grace period, closes."""
        await self.health.enter_graceful_shutdown()
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        await self.server.stop(grace)
        self._sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sweeper
        await self.engine.dispose()


async def _sweep_expired_holds(core: BillingCore, interval_s: float) -> None:
    while True:
        try:
            while await core.release_expired(_SWEEP_BATCH) == _SWEEP_BATCH:
                pass
        except Unavailable as error:
            _log.warning("releasing expired holds failed, will retry: %s", error.__cause__)
        except Exception:
            _log.exception("releasing expired holds failed, will retry")
        await asyncio.sleep(interval_s)


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then drains gracefully."""
    app = await Application.start(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    _log.info("draining (grace %.1fs)", settings.shutdown_grace_s)
    await app.stop()
