"""The ceiling of one PostgreSQL primary for holds/s, with coalesced writes.

    python -m bench.pg_ceiling [--processes 4] [--batch 32] [--tenants 10000] [--duration 10]

Drives the service's own batch statement (storage.postgres_batch: the ReserveCredit batch
function, then the Commit batch function for the same holds) straight from several load
processes, each with its own connection, no gRPC and no service in between, so that the load
generator is not what limits the figure. Each process sends batches of `--batch` reservations
(tenants drawn from a Zipf law, as bench.workload) and commits them in one more batch. Reports
holds/s (a hold = one reservation + its commit), PostgreSQL's CPU per hold and the share of the
machine it used. The point where a deployment must shard by tenant is this ceiling
(docs/deployment.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench import cpu, seed, workload
from bench.pg import Cluster
from billing_service.domain.commands import Commit
from billing_service.domain.model import Hold, HoldStatus
from billing_service.domain.pricing import ModelBilling, ModelPrice, TokenUsage
from billing_service.storage.migrations import migrate
from billing_service.storage.postgres_batch import install_sql
from billing_service.storage.postgres_hot_path import (
    COMMIT_BATCH,
    RESERVE_BATCH,
    commit_params,
    reserve_params,
)

_PREFIX = "ceil-"
# Time for the load processes to start and connect before the measured window opens.
_SPAWN_S = 10.0
PRICE = ModelPrice(
    workload.MODEL,
    ModelBilling.METERED,
    input_micros_per_mtok=1_000_000,
    cached_input_micros_per_mtok=500_000,
    output_micros_per_mtok=2_000_000,
)


def _hold(tenant: str, now: datetime) -> Hold:
    return Hold(
        hold_id=f"rsv_{uuid.uuid4().hex}",
        request_id=str(uuid.uuid4()),
        request_fingerprint="0" * 64,
        tenant_id=tenant,
        user_id="ceiling",
        model=workload.MODEL,
        price=PRICE,
        amount_micros=workload.HOLD_MICROS,
        status=HoldStatus.OPEN,
        created_at=now,
        expires_at=now + timedelta(minutes=5),
        decision_available_micros=0,
    )


async def _drive(
    dsn: str, tenants: int, batch: int, start_at: float, duration_s: float, seed_n: int
) -> int:
    picker = workload.TenantPicker(workload.TenantChoice(_PREFIX, tenants), random.Random(seed_n))
    connection = await asyncpg.connect(dsn)
    holds = 0
    try:
        # Every process starts at the same moment, once all are up.
        await asyncio.sleep(max(0.0, start_at - time.time()))
        deadline = start_at + duration_s
        while time.time() < deadline:
            now = datetime.now(UTC)
            sent = [_hold(picker.pick(), now) for _ in range(batch)]
            rows = await connection.fetch(
                RESERVE_BATCH.call_sql,
                *RESERVE_BATCH.call_args([reserve_params(hold) for hold in sent]),
            )
            taken = [sent[row["item"] - 1] for row in rows if row["item_outcome"] == "done"]
            if len(taken) != batch:
                raise RuntimeError(f"{batch - len(taken)} reservations not taken")
            commits = [
                commit_params(
                    Commit(str(uuid.uuid4()), hold.hold_id, TokenUsage(1_000, 200, 300)),
                    "0" * 64,
                    now,
                )
                for hold in taken
            ]
            await connection.fetch(COMMIT_BATCH.call_sql, *COMMIT_BATCH.call_args(commits))
            holds += batch
    finally:
        await connection.close()
    return holds


def _process(args: tuple[str, int, int, float, float, int]) -> int:
    return asyncio.run(_drive(*args))


async def _prepare(cluster: Cluster, tenants: int) -> str:
    url = cluster.create_database("bench_ceiling")
    await migrate(url)
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        await seed.seed_tenants(engine, workload.TenantChoice(_PREFIX, tenants).tenant_ids())
    finally:
        await engine.dispose()
    dsn = url.replace("postgresql+asyncpg", "postgresql")
    connection = await asyncpg.connect(dsn)
    try:
        for function in (RESERVE_BATCH, COMMIT_BATCH):
            async with connection.transaction():
                for sql in install_sql(function):
                    await connection.execute(sql)
    finally:
        await connection.close()
    return dsn


def measure(processes: int, batch: int, tenants: int, duration_s: float) -> dict[str, Any]:
    cluster = Cluster(max_connections=processes + 10)
    cluster.start()
    try:
        with asyncio.Runner() as runner:
            runner.run(cluster.open())
            dsn = runner.run(_prepare(cluster, tenants))
            postmaster = runner.run(cluster.postmaster_pid())
            runner.run(cluster.close())
        context = multiprocessing.get_context("spawn")
        with context.Pool(processes) as pool:
            start_at = time.time() + _SPAWN_S
            calls = [(dsn, tenants, batch, start_at, duration_s, n) for n in range(processes)]
            pending = pool.map_async(_process, calls)
            time.sleep(max(0.0, start_at - time.time()))
            pg_before, busy_before = cpu.postgres_cpu_s(postmaster), cpu.machine_busy_s()
            time.sleep(duration_s)
            pg_s = cpu.postgres_cpu_s(postmaster) - pg_before
            busy_s = cpu.machine_busy_s() - busy_before
            counts = pending.get(timeout=duration_s + 120)
            elapsed = duration_s
    finally:
        cluster.stop()
    holds = sum(counts)
    return {
        "processes": processes,
        "batch": batch,
        "tenants": tenants,
        "seconds": elapsed,
        "holds": holds,
        "holds_per_s": holds / elapsed,
        "postgres_cpu_ms_per_hold": 1000 * pg_s / holds if holds else None,
        "postgres_share_of_machine": pg_s / busy_s if busy_s else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pg_ceiling", description=__doc__)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args(argv)
    result = measure(args.processes, args.batch, args.tenants, args.duration)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
