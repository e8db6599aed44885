"""The exposure cap under real concurrency: 500 ReserveCredit calls from four client processes
against two server processes sharing one PostgreSQL, then concurrent commits (some above their
hold), releases and retried request_ids. The ledger must balance to the micro.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select

from billing.v1 import admin_pb2, admin_pb2_grpc
from billing_service.domain.model import HoldStatus
from billing_service.storage.audit import audit_ledger
from billing_service.storage.database import create_engine
from billing_service.storage.tables import holds, tenants, usage_records
from tests.support.load_client import Reserved, Settle, reserve_many, settle_many
from tests.support.postgres import PostgresServer
from tests.support.server_process import ServerProcess

LIMIT = 25_000_000
AMOUNT = 300_007  # does not divide the limit: exactly 83 holds fit, with 99,419 micros left over
CALLS = 500
CLIENT_PROCESSES = 4
TENANT = "hot-tenant"

# One output token costs one micro, so a commit's cost is chosen exactly by the test.
PRICES = """
[models."unit-priced"]
billing = "metered"
output_micros_per_mtok = 1_000_000
"""

pytestmark = pytest.mark.slow


def _chunks(items: list[Any], count: int) -> list[list[Any]]:
    return [items[i::count] for i in range(count)]


async def _database_state(url: str) -> dict[str, Any]:
    engine = create_engine(url, pool_size=2)
    try:
        async with engine.connect() as conn:
            tenant = (
                await conn.execute(select(tenants).where(tenants.c.tenant_id == TENANT))
            ).one()
            open_holds = (
                await conn.execute(select(func.count()).where(holds.c.status == HoldStatus.OPEN))
            ).scalar_one()
            records = (await conn.execute(select(usage_records))).all()
        return {
            "tenant": tenant,
            "open_holds": open_holds,
            "records": records,
            "audit": await audit_ledger(engine),
        }
    finally:
        await engine.dispose()


def test_500_concurrent_reservations_on_two_servers_never_pass_the_cap(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.create_database("exposure_cap")
    price_table = tmp_path / "prices.toml"
    price_table.write_text(PRICES)
    settings = {
        "BILLING_DATABASE_URL": url,
        "BILLING_LISTEN_ADDRESS": "127.0.0.1:0",
        "BILLING_PRICE_TABLE": str(price_table),
        "BILLING_DB_POOL_SIZE": "20",
    }
    # Both servers migrate the same empty database at start-up, at the same time.
    with ServerProcess(settings) as first, ServerProcess(settings) as second:
        addresses = [first.address, second.address]
        with grpc.insecure_channel(first.address) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            admin.CreateTenant(
                admin_pb2.CreateTenantRequest(
                    request_id=str(uuid.uuid4()),
                    tenant_id=TENANT,
                    credit_limit_micros=LIMIT,
                    payment_method_on_file=True,
                )
            )

            request_ids = [f"reserve-{i}-{uuid.uuid4()}" for i in range(CALLS)]
            context = multiprocessing.get_context("spawn")
            with context.Pool(CLIENT_PROCESSES) as pool:
                reserved: list[Reserved] = [
                    answer
                    for chunk in pool.starmap(
                        reserve_many,
                        [
                            (addresses, TENANT, "unit-priced", AMOUNT, ids)
                            for ids in _chunks(request_ids, CLIENT_PROCESSES)
                        ],
                    )
                    for answer in chunk
                ]
                granted = [answer for answer in reserved if answer.allowed]
                assert len(granted) == LIMIT // AMOUNT == 83
                assert all(answer.amount_micros == AMOUNT for answer in granted)
                assert len({answer.reservation_id for answer in granted}) == 83

                tenant = admin.GetTenant(admin_pb2.GetTenantRequest(tenant_id=TENANT)).tenant
                assert tenant.balance.held_micros == 83 * AMOUNT
                assert tenant.balance.available_credit_micros == LIMIT - 83 * AMOUNT

                # A client that timed out retries with the same request ids: same answers.
                retried_ids = request_ids[: CALLS // 2]
                retried = [
                    answer
                    for chunk in pool.starmap(
                        reserve_many,
                        [
                            (addresses, TENANT, "unit-priced", AMOUNT, ids)
                            for ids in _chunks(retried_ids, CLIENT_PROCESSES)
                        ],
                    )
                    for answer in chunk
                ]
                by_id = {answer.request_id: answer for answer in reserved}
                for answer in retried:
                    first_answer = by_id[answer.request_id]
                    assert (answer.allowed, answer.reservation_id) == (
                        first_answer.allowed,
                        first_answer.reservation_id,
                    )

                # Settle every hold at once: a third released, a third committed under the hold,
                # a third committed 150,000 micros above it; every fourth sent twice concurrently.
                settles = []
                for i, answer in enumerate(granted):
                    output_tokens = [None, AMOUNT - 7, AMOUNT + 150_000][i % 3]
                    settles.append(
                        Settle(
                            f"settle-{i}",
                            answer.reservation_id,
                            output_tokens,
                            2 if i % 4 == 0 else 1,
                        )
                    )
                answers = [
                    group
                    for chunk in pool.starmap(
                        settle_many,
                        [(addresses, chunk) for chunk in _chunks(settles, CLIENT_PROCESSES)],
                    )
                    for group in chunk
                ]
                assert all(len(set(group)) == 1 for group in answers), "a retry got another answer"

        assert first.terminate() == 0
        assert second.terminate() == 0

    state = asyncio.run(_database_state(url))
    assert state["audit"] == []
    assert state["open_holds"] == 0
    tenant_row = state["tenant"]
    assert tenant_row.held_micros == 0
    records = state["records"]
    commits = [settle for settle in settles if settle.output_tokens is not None]
    assert len(records) == len(commits)
    assert -tenant_row.balance_micros == sum(record.charged_micros for record in records)
    assert -tenant_row.balance_micros <= LIMIT
    for record in records:
        assert record.cost_micros == record.charged_micros + record.uncollected_micros
        if record.cost_micros <= record.held_micros:
            assert record.charged_micros == record.cost_micros
