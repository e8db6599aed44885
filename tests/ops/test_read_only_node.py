"""A database node that stops taking writes (a demoted or fenced primary: every transaction
read-only, SQLSTATE 25006) while the service's pooled connections point at it.

Every call answers UNAVAILABLE / STORAGE_UNAVAILABLE and changes nothing, on the one-statement
hot path and on the general transaction alike; the connections are retired; with
`target_session_attrs=read-write` no new connection is made to the node while it is read-only
(also UNAVAILABLE, never INTERNAL); readiness goes NOT_SERVING either way; once the node takes
writes again, the retries with the same request_ids answer and the books balance.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from billing.v1 import admin_pb2, admin_pb2_grpc, billing_pb2, billing_pb2_grpc, types_pb2
from billing_service.storage.database import create_engine
from tests.ledger.books import assert_books_balance, snapshot
from tests.ops.conftest import RunningServer
from tests.support.grpc_errors import rich_error
from tests.support.postgres import PostgresServer

BILLING = "billing.v1.BillingService"
WAIT_S = 30.0
TENANT = "read-only-node"


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    """A server of this module's own: turning it read-only must not disturb the shared one."""
    with PostgresServer() as server:
        yield server


async def set_read_only(server: PostgresServer, read_only: bool) -> None:
    """Turns every transaction read-only (or back), as a fencing HA manager does, and waits until
    the postmaster has applied it (it signals the open sessions in the same step)."""
    dsn = f"postgresql://postgres@{server.host}:{server.port}/postgres"
    admin = await asyncpg.connect(dsn)
    try:
        value = "on" if read_only else "off"
        await admin.execute(f"ALTER SYSTEM SET default_transaction_read_only = {value}")
        await admin.execute("SELECT pg_reload_conf()")
    finally:
        await admin.close()
    async with asyncio.timeout(WAIT_S):
        while True:
            fresh = await asyncpg.connect(dsn)
            try:
                if await fresh.fetchval("SHOW default_transaction_read_only") == value:
                    return
            finally:
                await fresh.close()
            await asyncio.sleep(0.05)  # polling a condition, bounded by the timeout above


def reserve_request(request_id: str) -> billing_pb2.ReserveCreditRequest:
    return billing_pb2.ReserveCreditRequest(
        request_id=request_id, tenant_id=TENANT, user_id="u", model="unit-priced", amount_micros=50
    )


@pytest.mark.parametrize(
    "session_attrs",
    # With it, asyncpg refuses new connections to the node; without, they fail on their write.
    ["?target_session_attrs=read-write", ""],
    ids=["read-write-only", "any-node"],
)
async def test_a_read_only_node_answers_unavailable_and_changes_nothing(
    own_postgres: PostgresServer, running_server: RunningServer, session_attrs: str
) -> None:
    database = f"read_only_node_{len(session_attrs)}"
    url = own_postgres.create_database(database) + session_attrs
    engine = create_engine(url, pool_size=1)
    async with (
        running_server(database_url=url, health_check_interval_s=0.05, db_pool_size=4) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        billing = billing_pb2_grpc.BillingServiceStub(channel)
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=BILLING)
        )
        await admin.CreateTenant(
            admin_pb2.CreateTenantRequest(
                request_id=str(uuid.uuid4()),
                tenant_id=TENANT,
                payment_method_on_file=True,
                credit_limit_micros=1_000_000,
            )
        )
        # Every pooled connection opened and used before the node turns read-only.
        opened = await asyncio.gather(
            *(billing.ReserveCredit(reserve_request(str(uuid.uuid4()))) for _ in range(8))
        )
        assert all(answer.decision.allowed for answer in opened)
        before = await snapshot(engine)

        await set_read_only(own_postgres, True)
        try:
            failed: dict[str, grpc.aio.AioRpcError] = {}
            reserve_id, commit_id, grant_id = (str(uuid.uuid4()) for _ in range(3))
            calls = {
                # The one-statement hot path.
                reserve_id: billing.ReserveCredit(reserve_request(reserve_id), timeout=WAIT_S),
                commit_id: billing.Commit(
                    billing_pb2.CommitRequest(
                        request_id=commit_id,
                        reservation_id=opened[0].reservation.reservation_id,
                        usage=types_pb2.TokenUsage(output_tokens=40),
                    ),
                    timeout=WAIT_S,
                ),
                # The general transaction.
                grant_id: admin.GrantCredit(
                    admin_pb2.GrantCreditRequest(
                        request_id=grant_id, tenant_id=TENANT, amount_micros=7, reason="x"
                    ),
                    timeout=WAIT_S,
                ),
            }
            for request_id, call in calls.items():
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call
                failed[request_id] = refused.value
            # More calls than pooled connections: old ones retired, new ones refused by
            # target_session_attrs=read-write.
            for attempt in range(6):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await billing.ReserveCredit(reserve_request(reserve_id), timeout=WAIT_S)
                failed[f"attempt-{attempt}"] = refused.value
            for error in failed.values():
                details = rich_error(error)
                assert (details.code, details.reason) == (
                    grpc.StatusCode.UNAVAILABLE,
                    "STORAGE_UNAVAILABLE",
                ), details
            # Readiness follows: the next check finds no writable node.
            async with asyncio.timeout(WAIT_S):
                async for status in watch:
                    if status.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        break
        finally:
            await set_read_only(own_postgres, False)
        assert await snapshot(engine) == before  # nothing was written

        # The node takes writes again: the same request ids now answer, each once.
        reserved = await billing.ReserveCredit(reserve_request(reserve_id), timeout=WAIT_S)
        assert reserved.decision.allowed
        committed = await billing.Commit(
            billing_pb2.CommitRequest(
                request_id=commit_id,
                reservation_id=opened[0].reservation.reservation_id,
                usage=types_pb2.TokenUsage(output_tokens=40),
            ),
            timeout=WAIT_S,
        )
        assert committed.usage_record.charged_micros == 40
        await admin.GrantCredit(
            admin_pb2.GrantCreditRequest(
                request_id=grant_id, tenant_id=TENANT, amount_micros=7, reason="x"
            ),
            timeout=WAIT_S,
        )
        again = await billing.ReserveCredit(reserve_request(reserve_id), timeout=WAIT_S)
        assert again.reservation.reservation_id == reserved.reservation.reservation_id
        watch.cancel()
    try:
        await assert_books_balance(engine)
    finally:
        await engine.dispose()
