"""What a hold that grows costs on PostgreSQL: an extension next to a reservation, and a streamed
query (a hold, several extensions, a commit) next to a plain one (a hold, a commit).

    python -m bench.extend [--calls 2000] [--rounds 6] [--extensions 4]
                           [--out bench/results/extend-DATE.json]

Starts a throwaway PostgreSQL, migrates it, and calls the billing core (BillingCore over
LedgerStore, the code the RPCs run below gRPC) for one tenant whose limit never denies, at 1
caller and at 16 concurrent callers on that tenant (its row is the hot row every call locks).
Rounds alternate between what is compared so that drift (cache warm-up, WAL checkpoints) hits
both alike. Reports the median per-call (per-query) time of each and their ratio. A reservation
and an extension (of a hold without budgets, as here) each run their one-statement hot path
(storage.postgres_hot_path); an extension with budgets, or a denied one, runs the general
row-locked transaction. After each run the ledger audit must be clean.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.pg import Cluster
from billing_service.core import BillingCore, CoreSettings
from billing_service.domain.commands import Commit, CreateTenant, ExtendHold, Reserve
from billing_service.domain.pricing import ModelBilling, ModelPrice, PriceTable, TokenUsage
from billing_service.storage.audit import audit_ledger
from billing_service.storage.database import create_engine
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
TENANT = "streaming"
LIMIT = 10**12
INPUT_TOKENS = 1_200
FIRST_OUTPUT_TOKENS = 256  # a streamed query's first hold: the input and a first chunk
CHUNK_TOKENS = 256  # each extension
Round = Callable[[BillingCore, int, int, str], Awaitable[float]]


async def _callers(callers: int, work: Callable[[int], Awaitable[None]]) -> float:
    started = time.perf_counter()
    await asyncio.gather(*(work(index) for index in range(callers)))
    return time.perf_counter() - started


def _reserve(request_id: str, index: int) -> Reserve:
    return Reserve(
        request_id,
        TENANT,
        f"u{index}",
        MODEL,
        amount_micros=INPUT_TOKENS + 2 * FIRST_OUTPUT_TOKENS,
    )


async def _open_hold(core: BillingCore, request_id: str, index: int) -> str:
    result = await core.reserve(_reserve(request_id, index))
    assert result.hold is not None, result.decision
    return result.hold.hold_id


async def reservations(core: BillingCore, calls: int, callers: int, tag: str) -> float:
    """Seconds per ReserveCredit, as seen by one caller (the holds stay open)."""

    async def caller(index: int) -> None:
        for n in range(calls // callers):
            await _open_hold(core, f"{tag}-{index}-{n}", index)

    return await _callers(callers, caller) * callers / calls


async def extensions(core: BillingCore, calls: int, callers: int, tag: str) -> float:
    """Seconds per ExtendHold, as seen by one caller: each caller grows one open hold."""
    holds = [await _open_hold(core, f"{tag}-hold-{i}", i) for i in range(callers)]

    async def caller(index: int) -> None:
        for n in range(calls // callers):
            result = await core.extend_hold(
                ExtendHold(f"{tag}-{index}-{n}", holds[index], CHUNK_TOKENS)
            )
            assert result.decision.allowed, result.decision

    return await _callers(callers, caller) * callers / calls


def _queries(extensions_per_query: int) -> Round:
    async def queries(core: BillingCore, calls: int, callers: int, tag: str) -> float:
        """Seconds per query (a hold, `extensions_per_query` extensions, a commit), as seen by
        one caller; `calls` counts queries."""

        async def caller(index: int) -> None:
            for n in range(calls // callers):
                rid = f"{tag}-{index}-{n}"
                hold_id = await _open_hold(core, rid, index)
                for e in range(extensions_per_query):
                    extension = ExtendHold(
                        f"{rid}-e{e}",
                        hold_id,
                        CHUNK_TOKENS,
                        TokenUsage(INPUT_TOKENS, 0, FIRST_OUTPUT_TOKENS + e * CHUNK_TOKENS),
                    )
                    assert (await core.extend_hold(extension)).decision.allowed
                output = FIRST_OUTPUT_TOKENS + extensions_per_query * CHUNK_TOKENS - 10
                await core.commit(Commit(f"{rid}-c", hold_id, TokenUsage(INPUT_TOKENS, 0, output)))

        return await _callers(callers, caller) * callers / calls

    return queries


async def _compare(
    core: BillingCore, rounds: dict[str, Round], calls: int, callers: int, count: int, tag: str
) -> dict[str, Any]:
    times: dict[str, list[float]] = {name: [] for name in rounds}
    for index in range(count):
        names = list(rounds) if index % 2 == 0 else list(reversed(rounds))
        for name in names:
            times[name].append(await rounds[name](core, calls, callers, f"{tag}-{name}-{index}"))
    base, other = list(rounds)
    paired = [o / b for b, o in zip(times[base], times[other], strict=True)]
    return {
        f"{base}_ms": statistics.median(times[base]) * 1000,
        f"{other}_ms": statistics.median(times[other]) * 1000,
        "ratio": statistics.median(times[other]) / statistics.median(times[base]),
        # Each round's pair ran back to back: less exposed to load on a shared machine.
        "ratio_of_pairs_median": statistics.median(paired),
        "rounds_ms": {name: [v * 1000 for v in times[name]] for name in times},
    }


async def measure(url: str, calls: int, rounds: int, extensions_per_query: int) -> dict[str, Any]:
    engine = create_engine(url, pool_size=20)
    try:
        core = BillingCore(LedgerStore(engine), PRICES, CoreSettings())
        await core.create_tenant(CreateTenant("create", TENANT, LIMIT, payment_method_on_file=True))
        await reservations(core, 100, 1, "warm-reserve")
        await extensions(core, 100, 1, "warm-extend")
        result: dict[str, Any] = {}
        for callers in (1, 16):
            result[f"callers_{callers}"] = {
                "extension_vs_reservation": await _compare(
                    core,
                    {"reservation": reservations, "extension": extensions},
                    calls,
                    callers,
                    rounds,
                    f"call-{callers}",
                ),
                "streamed_vs_plain_query": await _compare(
                    core,
                    {"plain_query": _queries(0), "streamed_query": _queries(extensions_per_query)},
                    max(callers, calls // (extensions_per_query + 2)),
                    callers,
                    rounds,
                    f"query-{callers}",
                ),
            }
        result["audit"] = await audit_ledger(engine)
        return result
    finally:
        await engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--extensions", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cluster = Cluster(max_connections=50)
    cluster.start()
    try:
        url = cluster.create_database("bench_extend")
        with asyncio.Runner() as runner:
            runner.run(migrate(url))
            result = runner.run(measure(url, args.calls, args.rounds, args.extensions))
    finally:
        cluster.stop()
    result["calls_per_round"] = args.calls
    result["rounds"] = args.rounds
    result["extensions_per_streamed_query"] = args.extensions
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0 if result["audit"] == [] else 1


if __name__ == "__main__":
    raise SystemExit(main())
