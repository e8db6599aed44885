"""The dashboard summary read with 1,000,000 usage records vs 10, and the commit's rollup cost.

    python -m bench.dashboard [--records N] [--calls N] [--out bench/results/dashboard]

On a throwaway PostgreSQL: tenant "dash-small" gets 10 usage records this month and "dash-big"
gets N (1,000,000) spread over the last 365 days, both with the same 3 models and 4 users, written
in bulk with INSERT ... SELECT generate_series (per record a committed hold, its `hold` and
`debit` ledger entries, the usage record) and their rollups summed from the records; the tenants'
balances are minus their charges, so `check_invariants` stays clean. Then one server process
answers GetUsageSummary (default period: this month) at concurrency 1, in alternating rounds.

Reported: p50/p99 of both reads and their ratio, EXPLAIN (ANALYZE, BUFFERS) of the summary's
queries for both tenants, and the mean time of the one-statement Commit with and without its
rollup upsert (the same statement text minus the `rollup` CTE, run alternately in one run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench import seed, workload
from bench.pg import Cluster
from bench.servers import Servers
from billing.v1 import usage_pb2, usage_pb2_grpc
from billing_service.domain.model import Hold, HoldStatus
from billing_service.domain.pricing import ModelBilling, ModelPrice, TokenUsage
from billing_service.storage import postgres_hot_path
from billing_service.storage.migrations import migrate
from billing_service.storage.postgres_hot_path import COMMIT

TARGET = "summary read with 1,000,000 usage records within 1.5x of 10"
TENANTS = {"dash-small": 10, "dash-big": 1_000_000}
MODELS = ("gpt-4o", "o3", "claude-sonnet-4-5")
USERS = 4
STEP = 250_000


def measure_dashboard_summary(
    records: int = 1_000_000, calls: int = 500, explain_out: Path | None = None
) -> dict[str, Any]:
    """Runs the whole measurement on its own PostgreSQL; returns the JSON-able result."""
    cluster = Cluster(max_connections=50)
    cluster.start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as work:
            prices = Path(work) / "prices.toml"
            prices.write_text(workload.PRICE_TABLE_TOML)
            url = cluster.create_database("bench_dashboard")
            with asyncio.Runner() as runner:
                runner.run(cluster.open())
                runner.run(migrate(url))
                engine = create_async_engine(cluster.harness_url("bench_dashboard"), pool_size=17)
                try:
                    sizes = {"dash-small": 10, "dash-big": records}
                    loaded = runner.run(_bulk_load(engine, sizes))
                    check = runner.run(seed.check_invariants(engine))
                    servers = Servers(url, 1, pool_size=4, price_table=prices, extra_settings={})
                    try:
                        reads = _summary_reads(servers.addresses[0], calls)
                    finally:
                        servers.stop()
                    explain = runner.run(_explain(engine))
                    commits = 200 if calls < 500 else 3000
                    commit_cost = runner.run(_commit_cost(engine, commits, 1))
                    commit_hot = runner.run(_commit_cost(engine, commits, 16))
                finally:
                    runner.run(engine.dispose())
                    runner.run(cluster.close())
    finally:
        cluster.stop()
    if explain_out is not None:
        explain_out.write_text(explain)
    small, big = reads["dash-small"], reads["dash-big"]
    return {
        "measurable": True,
        "target": TARGET,
        "records": sizes,
        "bulk_load": loaded,
        "invariants": check.as_json(),
        "calls_per_tenant": calls,
        "small": small,
        "big": big,
        "ratio_p50": big["p50_ms"] / small["p50_ms"],
        "ratio_p99": big["p99_ms"] / small["p99_ms"],
        "commit_rollup_cost": commit_cost,
        "commit_rollup_cost_16_callers": commit_hot,
        "explain": explain,
    }


async def _bulk_load(engine: AsyncEngine, sizes: dict[str, int]) -> dict[str, Any]:
    started = time.monotonic()
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        for tenant in sizes:
            await conn.execute(
                text(
                    "INSERT INTO tenants (tenant_id, status, credit_limit_micros, "
                    "payment_method_on_file, balance_micros, held_micros, created_at, updated_at) "
                    "VALUES (:t, 'active', 1000000000000, true, 0, 0, :now, :now)"
                ),
                {"t": tenant, "now": now},
            )
    for tenant, count in sizes.items():
        # The small tenant's records are all this month; the big one's span a year.
        span_s = 365 * 86400 if count > 1000 else 60
        for first in range(1, count + 1, STEP):
            last = min(count, first + STEP - 1)
            params = {"t": tenant, "first": first, "last": last, "now": now, "span": span_s}
            async with engine.begin() as conn:
                # Consistent by construction: skip the per-row foreign-key triggers.
                await conn.execute(text("SET LOCAL session_replication_role = replica"))
                for statement in _LOAD:
                    await conn.execute(text(statement), params)
    async with engine.begin() as conn:
        await conn.execute(text(_ROLLUPS))
        await conn.execute(text(_BALANCES))
    async with engine.connect() as conn:
        autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await autocommit.execute(
            text("VACUUM ANALYZE tenants, holds, ledger_entries, usage_records, usage_rollups")
        )
        # Written out now, so the measurements do not meet the load's checkpoint.
        await autocommit.execute(text("CHECKPOINT"))
        rollups = (await autocommit.execute(text(_ROLLUP_COUNTS))).all()
    return {
        "load_s": round(time.monotonic() - started, 1),
        "rollup_rows": {row.tenant_id: row.rows for row in rollups},
        "rollup_rows_this_month": {row.tenant_id: row.this_month for row in rollups},
    }


# A record g of tenant :t: committed (g * 7919) % :span seconds before :now, so the year fills
# evenly; the model and user cycle through 3 x 4 values.
_TENANT = "CAST(:t AS text)"
_RECORD = f"'dash-' || {_TENANT} || '-' || lpad(g::text, 9, '0')"
_AT = "CAST(:now AS timestamptz) - ((g * 7919) % :span) * interval '1 second'"
_LOAD = (
    "INSERT INTO holds (hold_id, request_id, request_fingerprint, tenant_id, user_id, model, "
    "billing, input_micros_per_mtok, cached_input_micros_per_mtok, output_micros_per_mtok, "
    "flat_micros_per_call, amount_micros, status, decision_available_micros, refunded_micros, "
    "created_at, expires_at, settled_at) "
    f"SELECT {_RECORD}, 'r-' || {_RECORD}, repeat('0', 64), {_TENANT}, "
    f"'user-' || (g % {USERS}), "
    f"(ARRAY{list(MODELS)})[1 + g % {len(MODELS)}], 'metered', 2000000, 500000, 8000000, 0, "
    f"2000, 'committed', 0, 0, {_AT}, {_AT} + interval '300 s', {_AT} "
    "FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS g",
    "INSERT INTO ledger_entries (tenant_id, kind, hold_id, balance_delta_micros, "
    "held_delta_micros, balance_after_micros, held_after_micros, available_after_micros, "
    "created_at) "
    f"SELECT {_TENANT}, k.kind, {_RECORD}, k.balance, k.held, 0, 0, 0, {_AT} "
    "FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS g, "
    "(VALUES ('hold', 0, 2000), ('debit', -1500, -2000)) AS k(kind, balance, held) "
    "ORDER BY g, k.held DESC",
    "INSERT INTO usage_records (hold_id, request_id, request_fingerprint, tenant_id, user_id, "
    "model, input_tokens, cached_input_tokens, output_tokens, cost_micros, charged_micros, "
    "uncollected_micros, held_micros, payment_source, reserved_at, committed_at, "
    "available_after_micros) "
    f"SELECT {_RECORD}, 'c-' || {_RECORD}, repeat('0', 64), {_TENANT}, "
    f"'user-' || (g % {USERS}), "
    f"(ARRAY{list(MODELS)})[1 + g % {len(MODELS)}], 500, 0, 62, 1500, 1500, 0, 2000, 'credit', "
    f"{_AT}, {_AT}, 0 "
    "FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS g",
)
_ROLLUPS = """
INSERT INTO usage_rollups (tenant_id, day, model, user_id, call_count, input_tokens,
    cached_input_tokens, output_tokens, cost_micros, charged_micros)
SELECT tenant_id, (committed_at AT TIME ZONE 'UTC')::date, model, user_id, count(*),
    sum(input_tokens), sum(cached_input_tokens), sum(output_tokens), sum(cost_micros),
    sum(charged_micros)
FROM usage_records GROUP BY 1, 2, 3, 4
"""
_BALANCES = """
UPDATE tenants SET balance_micros = -charged.total
FROM (SELECT tenant_id, sum(charged_micros) AS total FROM usage_records GROUP BY 1) AS charged
WHERE tenants.tenant_id = charged.tenant_id
"""
_ROLLUP_COUNTS = """
SELECT tenant_id, count(*) AS rows,
    count(*) FILTER (WHERE day >= date_trunc('month', now() AT TIME ZONE 'UTC')) AS this_month
FROM usage_rollups GROUP BY 1
"""


def _summary_reads(address: str, calls: int) -> dict[str, dict[str, float]]:
    """GetUsageSummary at concurrency 1, both tenants in alternating rounds after a warm-up."""
    latencies: dict[str, list[float]] = {tenant: [] for tenant in TENANTS}
    rounds = 4
    with grpc.insecure_channel(address) as channel:
        stub = usage_pb2_grpc.UsageServiceStub(channel)
        for number in range(rounds + 1):
            order = list(TENANTS) if number % 2 else list(reversed(TENANTS))
            for tenant in order:
                request = usage_pb2.GetUsageSummaryRequest(tenant_id=tenant)
                for _ in range(max(1, calls // rounds)):
                    started = time.perf_counter()
                    answer = stub.GetUsageSummary(request, timeout=30)
                    elapsed = time.perf_counter() - started
                    if number:  # round 0 warms up both
                        latencies[tenant].append(elapsed * 1000)
                assert answer.totals.call_count > 0
    return {tenant: _stats(values) for tenant, values in latencies.items()}


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "calls": len(ordered),
        "p50_ms": round(statistics.median(ordered), 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
        "mean_ms": round(statistics.fmean(ordered), 3),
    }


async def _explain(engine: AsyncEngine) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of the summary's two queries and of a usage-records page."""
    today = datetime.now(UTC).date()
    start, end = today.replace(day=1), (today.replace(day=1) + timedelta(days=32)).replace(day=1)
    queries = {
        "by model": _SUMMARY_QUERY.format(key="model", limit=""),
        "by user": _SUMMARY_QUERY.format(key="user_id", limit="LIMIT 1001"),
        "usage records, first page": _PAGE_QUERY,
    }
    parts: list[str] = []
    async with engine.connect() as conn:
        for tenant in TENANTS:
            for what, query in queries.items():
                plan = await conn.execute(
                    text(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {query}"),
                    {"t": tenant, "start": start, "end": end},
                )
                lines = "\n".join(row[0] for row in plan)
                parts.append(f"-- {tenant}: {what}\n{lines}\n")
    return "\n".join(parts)


# What storage/usage_store.py sends (the rollups grouped per key, costliest first).
_SUMMARY_QUERY = """
SELECT {key}, CAST(sum(call_count) AS BIGINT), CAST(sum(input_tokens) AS BIGINT),
    CAST(sum(cached_input_tokens) AS BIGINT), CAST(sum(output_tokens) AS BIGINT),
    CAST(sum(cost_micros) AS BIGINT), CAST(sum(charged_micros) AS BIGINT)
FROM usage_rollups
WHERE tenant_id = :t AND day >= :start AND day < :end
GROUP BY {key} ORDER BY sum(cost_micros) DESC, {key} {limit}
"""
_PAGE_QUERY = """
SELECT * FROM usage_records WHERE tenant_id = :t
ORDER BY committed_at DESC, hold_id DESC LIMIT 101
"""


async def _commit_cost(engine: AsyncEngine, commits: int, concurrency: int) -> dict[str, Any]:
    """The one-statement Commit with and without its rollup CTE on one tenant, one user and one
    model (every commit updates the same rollup row), in alternating rounds, `concurrency`
    connections at once. Timed: the Commit statement alone (each caller reserves first)."""
    with_sql = COMMIT.text
    without_sql = re.sub(
        r"\), rollup AS \(.*?\n\)\nINSERT INTO usage_records",
        ")\nINSERT INTO usage_records",
        with_sql,
        flags=re.DOTALL,
    )
    if without_sql == with_sql:
        raise RuntimeError("the Commit statement has no `rollup` CTE to take out")
    without = postgres_hot_path.typed_statement(
        without_sql,
        text_params=("hold_id", "request_id", "request_fingerprint"),
        time_params=("now",),
    )
    statements = {"with_rollup": COMMIT, "without_rollup": without}
    times: dict[str, list[float]] = {variant: [] for variant in statements}
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    usage = TokenUsage(500, 0, 62)

    async def caller(variant: str, count: int) -> None:
        async with autocommit.connect() as conn:
            for _ in range(count):
                hold = _hold("dash-small")
                reserve_params = postgres_hot_path.reserve_params(hold)
                reserved = await conn.execute(postgres_hot_path.RESERVE, reserve_params)
                assert reserved.one_or_none() is not None
                params = {
                    "hold_id": hold.hold_id,
                    "request_id": str(uuid.uuid4()),
                    "request_fingerprint": "0" * 64,
                    "input_tokens": usage.input_tokens,
                    "cached_input_tokens": usage.cached_input_tokens,
                    "output_tokens": usage.output_tokens,
                    "now": datetime.now(UTC),
                }
                started = time.perf_counter()
                row = (await conn.execute(statements[variant], params)).one_or_none()
                times[variant].append((time.perf_counter() - started) * 1000)
                assert row is not None

    rounds = 20
    for number in range(rounds + 2):  # the first two rounds warm both up and are dropped
        variant = ("with_rollup", "without_rollup")[number % 2]
        per_caller = max(1, commits // rounds // concurrency)
        if number < 2:
            await asyncio.gather(*(caller(variant, 5) for _ in range(concurrency)))
            times[variant].clear()
            continue
        await asyncio.gather(*(caller(variant, per_caller) for _ in range(concurrency)))
    result: dict[str, Any] = {variant: _stats(values) for variant, values in times.items()}
    result["concurrency"] = concurrency
    result["ratio_mean"] = result["with_rollup"]["mean_ms"] / result["without_rollup"]["mean_ms"]
    result["note"] = (
        "the same one-statement Commit with and without the rollup CTE, one tenant, user and "
        "model, alternating rounds; the records written without it are missing from the rollups"
    )
    return result


def _hold(tenant: str) -> Hold:
    now = datetime.now(UTC)
    price = ModelPrice("gpt-4o", ModelBilling.METERED, 2_500_000, 1_250_000, 10_000_000)
    return Hold(
        hold_id=f"rsv_{uuid.uuid4().hex}",
        request_id=str(uuid.uuid4()),
        request_fingerprint="0" * 64,
        tenant_id=tenant,
        user_id="user-0",
        model="gpt-4o",
        price=price,
        amount_micros=10_000,
        status=HoldStatus.OPEN,
        created_at=now,
        expires_at=now + timedelta(minutes=5),
        decision_available_micros=0,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("bench/results/dashboard"))
    args = parser.parse_args(argv)
    explain = args.out.with_name(args.out.name + "-explain.txt")
    result = measure_dashboard_summary(args.records, args.calls, explain)
    args.out.with_name(args.out.name + ".json").write_text(json.dumps(result, indent=2) + "\n")
    small, big, commit = result["small"], result["big"], result["commit_rollup_cost"]
    print(f"summary p50: {small['p50_ms']} ms (10 records), {big['p50_ms']} ms ({args.records:,})")
    print(f"ratio p50 {result['ratio_p50']:.2f}, p99 {result['ratio_p99']:.2f} (target <= 1.5)")
    print(
        f"commit mean: {commit['with_rollup']['mean_ms']} ms with the rollup upsert, "
        f"{commit['without_rollup']['mean_ms']} ms without (x{commit['ratio_mean']:.2f})"
    )
    hot = result["commit_rollup_cost_16_callers"]
    print(
        f"16 callers on one rollup row: commit mean {hot['with_rollup']['mean_ms']} ms with, "
        f"{hot['without_rollup']['mean_ms']} ms without (x{hot['ratio_mean']:.2f})"
    )
    print(f"invariants ok: {result['invariants']['ok']}; EXPLAIN in {explain}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
