"""Where a query's CPU goes on the SQLite default, below gRPC.

    python -m bench.sqlite_core [--queries 300]

Calls the billing core (BillingCore over LedgerStore, what a ReserveCredit and a Commit RPC run)
on a fresh SQLite file, one query at a time, and prints wall and CPU time per query; then the
CPU of one bare aiosqlite `execute` (a hop to its worker thread and back), and how many hops a
query makes: to aiosqlite's thread (counted by wrapping its dispatch) and to the single writer's
thread (storage.sqlite_writer, one per transaction). The rest of a query's CPU is SQLAlchemy and
the service's own Python.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import aiosqlite

from billing_service.core import BillingCore, CoreSettings
from billing_service.domain.commands import Commit, CreateTenant, Reserve
from billing_service.domain.pricing import ModelBilling, ModelPrice, PriceTable, TokenUsage
from billing_service.storage.database import create_engine, sqlite_writer
from billing_service.storage.ledger_store import LedgerStore
from billing_service.storage.migrations import migrate

MODEL = "bench-metered"
PRICES = PriceTable(
    {
        MODEL: ModelPrice(
            MODEL,
            ModelBilling.METERED,
            input_micros_per_mtok=1_000_000,
            output_micros_per_mtok=2_000_000,
        )
    }
)


async def _queries(core: BillingCore, tag: str, count: int) -> tuple[float, float]:
    """(wall ms, CPU ms) per query: ReserveCredit then Commit."""
    wall, cpu = time.perf_counter(), time.process_time()
    for n in range(count):
        result = await core.reserve(Reserve(f"{tag}-{n}", "t", "u", MODEL, amount_micros=2_800))
        assert result.hold is not None, result.decision
        await core.commit(Commit(f"{tag}-c{n}", result.hold.hold_id, TokenUsage(100, 0, 50)))
    return (
        (time.perf_counter() - wall) * 1000 / count,
        (time.process_time() - cpu) * 1000 / count,
    )


async def _bare_hop_cpu_ms(path: Path, count: int = 2_000) -> float:
    async with aiosqlite.connect(path) as db:
        cpu = time.process_time()
        for _ in range(count):
            await db.execute("SELECT 1")
        return (time.process_time() - cpu) * 1000 / count


async def measure(directory: Path, count: int) -> dict[str, Any]:
    url = f"sqlite+aiosqlite:///{directory / 'billing.db'}"
    await migrate(url)
    engine = create_engine(url)
    try:
        core = BillingCore(LedgerStore(engine), PRICES, CoreSettings())
        await core.create_tenant(CreateTenant("create", "t", 10**12, payment_method_on_file=True))
        await _queries(core, "warm", 50)
        hops = 0
        dispatch = aiosqlite.Connection._execute

        async def counted(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal hops
            hops += 1
            return await dispatch(self, fn, *args, **kwargs)  # type: ignore[no-untyped-call]

        aiosqlite.Connection._execute = counted  # type: ignore[method-assign]
        writer = sqlite_writer(engine)
        writer_hops = writer.hops
        try:
            await _queries(core, "count", 20)
        finally:
            aiosqlite.Connection._execute = dispatch  # type: ignore[method-assign]
        writer_hops = writer.hops - writer_hops
        wall_ms, cpu_ms = await _queries(core, "measure", count)
    finally:
        await engine.dispose()
    return {
        "wall_ms_per_query": wall_ms,
        "cpu_ms_per_query": cpu_ms,
        "aiosqlite_hops_per_query": hops / 20,
        "writer_hops_per_query": writer_hops / 20,
        "cpu_ms_per_bare_hop": await _bare_hop_cpu_ms(directory / "hop.db"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sqlite_core", description=__doc__)
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        result = asyncio.run(measure(Path(directory), args.queries))
    for key, value in result.items():
        print(f"{key}: {value:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
