"""Readiness: the service names are SERVING only while the database is reachable, takes writes
and is migrated.

A periodic check (one connection, cheap queries: on PostgreSQL whether the node takes writes,
then the schema version and the open holds, which also feed the holds-open gauges) sets the
health status of the billing services. The "" service (liveness) is SERVING as long as the
process serves, whatever the database does: a database outage or a failover makes pods
unready, it does not get them restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from alembic.script import ScriptDirectory
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_service.domain.model import HoldStatus
from billing_service.metrics import Metrics
from billing_service.storage.database import is_postgres
from billing_service.storage.migrations import alembic_config
from billing_service.storage.tables import holds

__all__ = ["Readiness"]

_log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _NotReady(Exception):
    pass


class Readiness:
    def __init__(
        self,
        engine: AsyncEngine,
        health: health_aio.HealthServicer,
        service_names: Sequence[str],
        metrics: Metrics,
        *,
        interval_s: float,
        timeout_s: float,
        database_url: str,
    ) -> None:
        self._engine = engine
        self._health = health
        self._service_names = tuple(service_names)
        self._metrics = metrics
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        scripts = ScriptDirectory.from_config(alembic_config(database_url))
        self._head = scripts.get_current_head()
        self._known_revisions = {revision.revision for revision in scripts.walk_revisions()}
        self._ready: bool | None = None
        self._draining = False
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return bool(self._ready) and not self._draining

    async def check(self) -> bool:
        """Checks the database now and updates the health status; returns readiness."""
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._check_database()
        except _NotReady as problem:
            await self._set(False, str(problem))
        except TimeoutError:
            await self._set(False, f"the database did not answer within {self._timeout_s}s")
        except Exception as error:
            await self._set(False, f"the database is unreachable: {_one_line(error)}")
        else:
            await self._set(True, "the database is reachable and migrated")
        return self.ready

    def start(self) -> None:
        """Checks again every interval until `drain()`."""
        self._task = asyncio.create_task(self._run(), name="readiness-check")

    async def drain(self) -> None:
        """Readiness goes NOT_SERVING for good; liveness ("") is left SERVING."""
        self._draining = True
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for name in self._service_names:
            await self._health.set(name, NOT_SERVING)
        self._metrics.ready.set(0)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await self._stopping.wait()
            if not self._stopping.is_set():
                await self.check()

    async def _check_database(self) -> None:
        async with self._engine.connect() as conn:
            read_only = "SELECT current_setting('transaction_read_only')"
            if is_postgres(conn) and await conn.scalar(text(read_only)) == "on":
                # A standby, or a primary its HA manager demoted or fenced: every write fails.
                raise _NotReady("the database is read-only: not the primary (any more)")
            try:
                versions = set(
                    (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars()
                )
            except Exception as error:
                raise _NotReady(f"the database is not migrated: {_one_line(error)}") from None
            # A revision this release does not know was written by a newer release (a rolling
            # update migrated ahead); expand/contract migrations keep it compatible.
            if self._head not in versions and not versions - self._known_revisions:
                raise _NotReady(
                    f"the database schema is at {', '.join(sorted(versions)) or 'nothing'}, "
                    f"this release needs {self._head}: run `billing-service migrate`"
                )
            count, held = (
                await conn.execute(
                    select(func.count(), func.coalesce(func.sum(holds.c.amount_micros), 0)).where(
                        holds.c.status == HoldStatus.OPEN
                    )
                )
            ).one()
        self._metrics.holds_open.set(count)
        self._metrics.holds_open_micros.set(held)

    async def _set(self, ready: bool, why: str) -> None:
        if self._draining:
            return
        if ready != self._ready:
            if ready:
                _log.info("ready: %s", why)
            else:
                _log.warning("not ready: %s", why)
        self._ready = ready
        status = SERVING if ready else NOT_SERVING
        for name in self._service_names:
            await self._health.set(name, status)
        self._metrics.ready.set(1 if ready else 0)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
