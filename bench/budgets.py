"""What budgets cost ReserveCredit on PostgreSQL: the same reservation with no budget and with
two budgets applying (the user's and the API key's), in one process, as a ratio.

    python -m bench.budgets [--calls 2000] [--rounds 10] [--out bench/results/budgets-DATE.json]

Starts a throwaway PostgreSQL, migrates it, and calls the billing core (BillingCore.reserve over
LedgerStore, the code a ReserveCredit RPC runs below gRPC) for two tenants with the same
settings: one with no budget, one where a user budget and an API key budget apply (limits high
enough never to deny). Rounds alternate between the two so that drift (cache warm-up, WAL
checkpoints) hits both alike. Reports the median per-call time of each round and the ratio of
the medians, at 1 caller and at 16 concurrent callers on the tenant (hot row). Target: <= 1.2.

It also runs the reservation statement of a tenant with no budget against the statement as it
was before budgets (`--baseline-ref`, loaded with `git show`), one caller, alternating rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.pg import Cluster
from billing_service.budget_core import BudgetCore
from billing_service.core import BillingCore, CoreSettings
from billing_service.domain.budgets import BudgetPeriod, BudgetScope, SetBudget
from billing_service.domain.commands import CreateTenant, Reserve
from billing_service.domain.model import Hold, HoldStatus
from billing_service.domain.page_tokens import PageTokens
from billing_service.domain.pricing import ModelBilling, ModelPrice, PriceTable
from billing_service.storage.budget_store import BudgetStore
from billing_service.storage.database import create_engine
from billing_service.storage.ledger_store import LedgerStore
from billing_service.storage.migrations import migrate
from billing_service.storage.postgres_hot_path import RESERVE, reserve_params

TARGET = 1.2
BASELINE_REF = "a79c0ae"  # the hot path before budgets
HOT_PATH = "service/billing_service/storage/postgres_hot_path.py"
Statement = Callable[[Any, Hold], Awaitable[Any]]
MODEL = "bench-metered"
PRICES = PriceTable({MODEL: ModelPrice(MODEL, ModelBilling.METERED, flat_micros_per_call=1)})
AMOUNT = 2_800
LIMIT = 10**12


async def _setup(core: BillingCore, budgets: BudgetCore) -> None:
    for tenant in ("plain", "budgeted"):
        await core.create_tenant(
            CreateTenant(f"create-{tenant}", tenant, LIMIT, payment_method_on_file=True)
        )
    for caller in range(16):
        await budgets.set_budget(
            SetBudget(
                f"user-{caller}",
                "budgeted",
                BudgetScope.USER,
                f"u{caller}",
                LIMIT,
                BudgetPeriod.DAY,
            )
        )
    await budgets.set_budget(
        SetBudget("key", "budgeted", BudgetScope.API_KEY, "key", LIMIT, BudgetPeriod.MONTH)
    )


async def _round(core: BillingCore, tenant: str, calls: int, callers: int, tag: str) -> float:
    """Seconds per reservation, as seen by one caller, over `calls` reservations."""

    async def caller(index: int) -> None:
        for n in range(calls // callers):
            command = Reserve(
                f"{tag}-{index}-{n}",
                tenant,
                f"u{index}",
                MODEL,
                amount_micros=AMOUNT,
                api_key_id="key",
            )
            result = await core.reserve(command)
            assert result.decision.allowed, result.decision

    started = time.perf_counter()
    await asyncio.gather(*(caller(index) for index in range(callers)))
    return (time.perf_counter() - started) * callers / calls


async def reserve_statement(conn: Any, hold: Hold) -> Any:
    """Today's reservation statement, executed like the baseline's (through SQLAlchemy), so
    that the two differ by their SQL only."""
    return (await conn.execute(RESERVE, reserve_params(hold))).one_or_none()


def _baseline_statement(ref: str) -> Statement:
    """The reserve function of postgres_hot_path as it was at `ref`."""
    source = subprocess.run(
        ["git", "show", f"{ref}:{HOT_PATH}"], capture_output=True, text=True, check=True
    ).stdout
    namespace: dict[str, Any] = {"__name__": "baseline_hot_path"}
    exec(compile(source, f"{ref}:{HOT_PATH}", "exec"), namespace)
    function: Statement = namespace["reserve"]
    return function


def _hold(tenant: str) -> Hold:
    now = datetime.now(UTC)
    hold_id = f"rsv_{uuid.uuid4().hex}"
    return Hold(
        hold_id=hold_id,
        request_id=hold_id,
        request_fingerprint="0" * 64,
        tenant_id=tenant,
        user_id="u0",
        model=MODEL,
        price=PRICES.get(MODEL),
        amount_micros=AMOUNT,
        status=HoldStatus.OPEN,
        created_at=now,
        expires_at=now + timedelta(minutes=5),
        decision_available_micros=0,
    )


async def _statement_round(engine: Any, statement: Statement, calls: int) -> float:
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    started = time.perf_counter()
    for _ in range(calls):
        async with autocommit.connect() as conn:
            assert await statement(conn, _hold("plain")) is not None
    return (time.perf_counter() - started) / calls


async def _against_baseline(engine: Any, ref: str, calls: int, rounds: int) -> dict[str, Any]:
    statements = {"before_budgets": _baseline_statement(ref), "now": reserve_statement}
    times: dict[str, list[float]] = {name: [] for name in statements}
    for statement in statements.values():
        await _statement_round(engine, statement, 200)
    for index in range(rounds):
        names = list(statements) if index % 2 == 0 else list(reversed(statements))
        for name in names:
            times[name].append(await _statement_round(engine, statements[name], calls))
    before, now = (statistics.median(times[name]) for name in statements)
    paired = [n / b for b, n in zip(times["before_budgets"], times["now"], strict=True)]
    return {
        "baseline_ref": ref,
        "before_budgets_ms": before * 1000,
        "now_ms": now * 1000,
        "ratio": now / before,
        "ratio_of_pairs_median": statistics.median(paired),
        "rounds_ms": {name: [v * 1000 for v in times[name]] for name in times},
    }


async def _measure(url: str, calls: int, rounds: int, ref: str) -> dict[str, Any]:
    engine = create_engine(url, pool_size=20)
    try:
        core = BillingCore(LedgerStore(engine), PRICES, CoreSettings())
        await _setup(
            core, BudgetCore(BudgetStore(engine), lambda: datetime.now(UTC), PageTokens.random())
        )
        await _round(core, "plain", 200, 1, "warm-plain")
        await _round(core, "budgeted", 200, 1, "warm-budgeted")
        result: dict[str, Any] = {}
        for callers in (1, 16):
            times: dict[str, list[float]] = {"plain": [], "budgeted": []}
            for index in range(rounds):
                order = ("plain", "budgeted") if index % 2 == 0 else ("budgeted", "plain")
                for tenant in order:
                    tag = f"{tenant}-{callers}-{index}"
                    times[tenant].append(await _round(core, tenant, calls, callers, tag))
            plain, budgeted = (statistics.median(times[t]) for t in ("plain", "budgeted"))
            paired = [b / p for p, b in zip(times["plain"], times["budgeted"], strict=True)]
            result[f"callers_{callers}"] = {
                "no_budget_ms": plain * 1000,
                "two_budgets_ms": budgeted * 1000,
                "ratio": budgeted / plain,
                # Each round's pair ran back to back: less exposed to load on a shared machine.
                "ratio_of_pairs_median": statistics.median(paired),
                "rounds_ms": {t: [v * 1000 for v in times[t]] for t in times},
            }
        result["no_budget_statement_vs_before"] = await _against_baseline(
            engine, ref, calls, rounds
        )
        return result
    finally:
        await engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--baseline-ref", default=BASELINE_REF)
    args = parser.parse_args()
    cluster = Cluster(max_connections=50)
    cluster.start()
    try:
        url = cluster.create_database("bench_budgets")
        with asyncio.Runner() as runner:
            runner.run(migrate(url))
            result = runner.run(_measure(url, args.calls, args.rounds, args.baseline_ref))
    finally:
        cluster.stop()
    result["target"] = TARGET
    result["calls_per_round"] = args.calls
    result["rounds"] = args.rounds
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    worst = max(result[key]["ratio"] for key in ("callers_1", "callers_16"))
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
