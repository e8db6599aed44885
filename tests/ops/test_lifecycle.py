"""Lifecycle: SIGTERM under load, readiness across a database outage, during drain and before
migration. Every wait is on an event (a log line, a health Watch message), never on time."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from billing.v1 import admin_pb2, admin_pb2_grpc, billing_pb2, billing_pb2_grpc, types_pb2
from billing_service.storage.audit import audit_ledger
from billing_service.storage.database import create_engine
from billing_service.storage.migrations import migrate
from billing_service.storage.tables import holds, usage_records
from tests.ops.conftest import UNIT_PRICES, RunningServer
from tests.support.grpc_errors import rich_error
from tests.support.postgres import PostgresServer
from tests.support.server_process import ServerProcess

BILLING = "billing.v1.BillingService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WAIT_S = 60.0  # an upper bound for things that happen at once; reaching it is a failure


def rid(prefix: str = "") -> str:
    return f"{prefix}{uuid.uuid4()}"


# SIGTERM under load

TENANTS = [f"load-{i}" for i in range(8)]
WORKERS = 32
IN_FLIGHT_AT_SIGTERM = 16
CALL_TIMEOUT_S = 300.0  # longer than any wait below: a call never times out in a passing run


@dataclass
class Answers:
    reserved: dict[str, tuple[str, int]] = field(default_factory=dict)  # id -> tenant, amount
    committed: dict[str, int] = field(default_factory=dict)  # reservation id -> charged
    after_sigterm: int = 0
    # Calls that got no answer: (status code, request id).
    refused: list[tuple[str, str]] = field(default_factory=list)


class Load:
    """Workers that reserve then commit in a loop.

    Phase 1 runs until `stop_phase_one` is set; each worker then returns with one reservation
    left uncommitted. Phase 2 workers (request ids "p2-...") begin with a call that blocks on
    the test's lock (half commit their pending reservation, half reserve anew) and go on until
    the server refuses new calls.
    """

    def __init__(self, stub: billing_pb2_grpc.BillingServiceStub) -> None:
        self.stub = stub
        self.answers = Answers()
        self.sigterm_sent = False
        self.stop_phase_one = False
        self.warmed_up = asyncio.Event()
        self.last_request_id: dict[int, str] = {}

    def _answered(self) -> None:
        if self.sigterm_sent:
            self.answers.after_sigterm += 1
        if len(self.answers.committed) >= 100:
            self.warmed_up.set()

    async def _reserve(self, number: int, prefix: str) -> str:
        tenant = TENANTS[number % len(TENANTS)]
        self.last_request_id[number] = request_id = rid(prefix)
        reserved = await self.stub.ReserveCredit(
            billing_pb2.ReserveCreditRequest(
                request_id=request_id,
                tenant_id=tenant,
                user_id=f"user-{number}",
                model="unit-priced",
                amount_micros=2_000,
            ),
            timeout=CALL_TIMEOUT_S,
        )
        assert reserved.decision.allowed, reserved.decision
        reservation = reserved.reservation
        self.answers.reserved[reservation.reservation_id] = (tenant, reservation.amount_micros)
        self._answered()
        return str(reservation.reservation_id)

    async def _commit(self, number: int, prefix: str, reservation_id: str) -> None:
        self.last_request_id[number] = request_id = rid(prefix)
        committed = await self.stub.Commit(
            billing_pb2.CommitRequest(
                request_id=request_id,
                reservation_id=reservation_id,
                usage=types_pb2.TokenUsage(output_tokens=1_000 + number),
            ),
            timeout=CALL_TIMEOUT_S,
        )
        self.answers.committed[reservation_id] = committed.usage_record.charged_micros
        self._answered()

    async def phase_one(self, number: int) -> str:
        while True:
            reservation_id = await self._reserve(number, "p1-")
            if self.stop_phase_one:
                return reservation_id
            await self._commit(number, "p1-", reservation_id)

    async def phase_two(self, number: int, pending: str) -> None:
        try:
            if number % 2 == 0:
                await self._commit(number, "p2-", pending)
            while True:
                await self._commit(number, "p2-", await self._reserve(number, "p2-"))
        except grpc.aio.AioRpcError as error:
            # Once the server drains it refuses new calls; nothing else may fail.
            self.answers.refused.append((error.code().name, self.last_request_id[number]))


@pytest.mark.slow
def test_sigterm_under_load_finishes_in_flight_calls_and_loses_no_answer(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.create_database("sigterm_under_load")
    prices = tmp_path / "prices.toml"
    prices.write_text(UNIT_PRICES)
    settings = {
        "BILLING_DATABASE_URL": url,
        "BILLING_LISTEN_ADDRESS": "127.0.0.1:0",
        "BILLING_HEALTH_LISTEN_ADDRESS": "127.0.0.1:0",
        "BILLING_PRICE_TABLE": str(prices),
        # More connections than workers: calls blocked on the lock each hold one.
        "BILLING_DB_POOL_SIZE": str(WORKERS + 8),
        "BILLING_SHUTDOWN_GRACE_S": "120",
        "BILLING_LOG_LEVEL": "DEBUG",  # the guard logs "started" per call at DEBUG
    }
    with ServerProcess(settings) as server:
        answers = asyncio.run(_load_then_sigterm(server, url))
        exit_code = server.terminate(timeout_s=WAIT_S)
    assert exit_code == 0, "".join(server.log[-20:])
    drain = json.loads(server.wait_for_log(r'"message": "draining')[0])
    assert drain["in_flight"] >= IN_FLIGHT_AT_SIGTERM
    # The calls in flight at SIGTERM were blocked on our lock until after it: all answered.
    assert answers.after_sigterm >= IN_FLIGHT_AT_SIGTERM
    # Calls the draining server did not start: refused by its listener (UNAVAILABLE) or, sent
    # on the closing connection, cancelled by gRPC before any handler ran (CANCELLED).
    assert {code for code, _ in answers.refused} <= {"UNAVAILABLE", "CANCELLED"}
    assert answers.refused
    asyncio.run(_check_ledger(url, answers))


async def _load_then_sigterm(server: ServerProcess, url: str) -> Answers:
    async with grpc.aio.insecure_channel(server.address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        for tenant in TENANTS:
            await admin.CreateTenant(
                admin_pb2.CreateTenantRequest(
                    request_id=rid(),
                    tenant_id=tenant,
                    payment_method_on_file=True,
                    credit_limit_micros=10**12,
                )
            )
        load = Load(billing_pb2_grpc.BillingServiceStub(channel))
        first = [asyncio.create_task(load.phase_one(n)) for n in range(WORKERS)]
        await asyncio.wait_for(load.warmed_up.wait(), WAIT_S)
        load.stop_phase_one = True
        pending = await asyncio.wait_for(asyncio.gather(*first), WAIT_S)
        engine = create_engine(url, pool_size=1)
        try:
            async with engine.connect() as lock:
                # Every tenant row locked: every call of phase 2 waits for us inside the server.
                await _lock_tenants(lock)
                second = [
                    asyncio.create_task(load.phase_two(n, pending[n])) for n in range(WORKERS)
                ]
                await asyncio.to_thread(
                    server.wait_for_log,
                    r'"message": "started".*"request_id": "p2-',
                    WAIT_S,
                    IN_FLIGHT_AT_SIGTERM,
                )
                load.sigterm_sent = True
                server.send_signal()
                await asyncio.to_thread(server.wait_for_log, r'"message": "draining', WAIT_S)
                await _check_health_while_draining(server, channel)
                await lock.rollback()
            await asyncio.wait_for(asyncio.gather(*second), WAIT_S)
        finally:
            await engine.dispose()
    return load.answers


async def _lock_tenants(connection: AsyncConnection) -> None:
    await connection.begin()
    await connection.execute(text("SELECT tenant_id FROM tenants FOR UPDATE"))


async def _check_health_while_draining(server: ServerProcess, channel: grpc.aio.Channel) -> None:
    async with grpc.aio.insecure_channel(server.health_address) as health_channel:
        health = health_pb2_grpc.HealthStub(health_channel)
        liveness = await health.Check(health_pb2.HealthCheckRequest(service=""))
        readiness = await health.Check(health_pb2.HealthCheckRequest(service=BILLING))
    assert liveness.status == SERVING
    assert readiness.status == NOT_SERVING
    # The API port takes no new calls while draining.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await billing_pb2_grpc.BillingServiceStub(channel).CheckAccess(
            billing_pb2.CheckAccessRequest(tenant_id=TENANTS[0], model="unit-priced"),
            timeout=WAIT_S,
        )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def _check_ledger(url: str, answers: Answers) -> None:
    refused_ids = [request_id for _, request_id in answers.refused]
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as conn:
            columns = (holds.c.hold_id, holds.c.tenant_id, holds.c.amount_micros, holds.c.status)
            stored = {row.hold_id: row for row in await conn.execute(select(*columns))}
            records = select(usage_records.c.hold_id, usage_records.c.charged_micros)
            charged = {row.hold_id: row.charged_micros for row in await conn.execute(records)}
            traces = [
                *await conn.execute(
                    select(holds.c.request_id).where(holds.c.request_id.in_(refused_ids))
                ),
                *await conn.execute(
                    select(usage_records.c.request_id).where(
                        usage_records.c.request_id.in_(refused_ids)
                    )
                ),
            ]
        for reservation_id, (tenant, amount) in answers.reserved.items():
            row = stored[reservation_id]
            assert (row.tenant_id, row.amount_micros) == (tenant, amount)
        for reservation_id, charged_micros in answers.committed.items():
            assert stored[reservation_id].status == "committed"
            assert charged[reservation_id] == charged_micros
        assert traces == [], "a call that got no answer was applied"
        assert await audit_ledger(engine) == []
    finally:
        await engine.dispose()


# Readiness across a database outage


@pytest.fixture(scope="module")
def outage_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of this module's own: stopping it must not disturb the shared one."""
    with PostgresServer() as server:
        yield server


class HealthWatch:
    """The statuses a Health.Watch stream reports, one at a time."""

    def __init__(self, channel: grpc.aio.Channel, service: str) -> None:
        self._call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service)
        )

    async def next(self) -> int:
        answer = await asyncio.wait_for(self._call.read(), WAIT_S)
        assert isinstance(answer, health_pb2.HealthCheckResponse)
        return int(answer.status)

    def cancel(self) -> None:
        self._call.cancel()


async def test_readiness_follows_the_database_through_an_outage(
    outage_postgres: PostgresServer, running_server: RunningServer
) -> None:
    url = outage_postgres.create_database("outage")
    async with (
        running_server(database_url=url, health_check_interval_s=0.05) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        billing = billing_pb2_grpc.BillingServiceStub(channel)
        watch = HealthWatch(channel, BILLING)
        assert await watch.next() == SERVING

        await asyncio.to_thread(outage_postgres.pause)
        try:
            assert await watch.next() == NOT_SERVING
            # Liveness stays SERVING: a database outage must not get the pods restarted.
            live = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert live.status == SERVING
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await billing.ReserveCredit(_reserve_request("during-outage"), timeout=WAIT_S)
            error = rich_error(failed.value)
            assert (error.code, error.reason) == (
                grpc.StatusCode.UNAVAILABLE,
                "STORAGE_UNAVAILABLE",
            )
        finally:
            await asyncio.to_thread(outage_postgres.resume)

        assert await watch.next() == SERVING
        # Pooled connections from before the outage are dead: a call that draws one fails with
        # UNAVAILABLE and the pool drops it. Clients retry with the same request_id, as here.
        request = _reserve_request("after-outage")
        reasons = []
        for _ in range(app.settings.db_pool_size + 1):
            try:
                answer = await billing.ReserveCredit(request, timeout=WAIT_S)
                break
            except grpc.aio.AioRpcError as error:
                reasons.append(rich_error(error).reason)
        assert set(reasons) <= {"STORAGE_UNAVAILABLE"}
        assert answer.decision.allowed is False  # a new tenant without a card: a normal answer
        watch.cancel()


def _reserve_request(tenant: str) -> billing_pb2.ReserveCreditRequest:
    return billing_pb2.ReserveCreditRequest(
        request_id=rid(), tenant_id=tenant, user_id="u", model="unit-priced", amount_micros=5
    )


async def test_not_ready_until_the_database_is_migrated(
    running_server: RunningServer, sqlite_url: str
) -> None:
    async with (
        running_server(migrate_on_start=False, health_check_interval_s=0.05) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        live = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert live.status == SERVING
        watch = HealthWatch(channel, BILLING)
        assert await watch.next() == NOT_SERVING
        await migrate(sqlite_url)
        assert await watch.next() == SERVING
        watch.cancel()
