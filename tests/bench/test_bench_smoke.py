"""The benchmark harness still works: `python -m bench.run --smoke` runs every scenario
(PostgreSQL with 1 and 3 servers, SQLite), each with the plain query and the streamed one (a hold,
two extensions, a settle), the pgbench floor and the big-ledger comparison in a
few seconds, and every invariant check after every run passes. No speed is asserted.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = {"a", "b", "c-hot", "c-spread", "d-hot", "d-spread"}

pytestmark = pytest.mark.slow


def _check_run(run: dict[str, Any], what: str, rpcs: set[str]) -> None:
    assert run["queries_ok"] > 0, what
    assert run["queries_per_s"] > 0, what
    assert run["errors"] == {}, what
    assert run["denied"] == 0, what
    assert rpcs <= set(run["latency"]), what
    for rpc in rpcs:
        latency = run["latency"][rpc]
        assert 0 < latency["p50_ms"] <= latency["p95_ms"] <= latency["p99_ms"], what
    assert set(run["cpu"]["seconds"]) == {"servers", "postgres", "loadgen", "other"}, what
    assert run["invariants"]["ok"] is True, what
    assert run["invariants"]["audit"] == [], what
    assert run["invariants"]["tenants_below_zero"] == 0, what


def test_smoke_run_passes_every_invariant_check(tmp_path: Path) -> None:
    out = tmp_path / "smoke"
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(out)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    for suffix in (".json", ".md", ".png"):
        assert out.with_name(out.name + suffix).stat().st_size > 0
    result = json.loads(out.with_name("smoke.json").read_text())
    assert "## Streamed queries (ReserveCredit + 2 ExtendHold + settle)" in (
        out.with_name("smoke.md").read_text()
    )

    assert result["smoke"] is True
    assert result["ok"] is True, result["problems"]
    assert result["invariants_ok"] is True
    assert result["problems"] == []
    machine = result["machine"]
    assert machine["logical_cores"] >= 1
    assert machine["memory_bytes"] > 0
    assert machine["cpu_model"]
    assert machine["python"].startswith("3.")
    assert machine["postgresql"].startswith("PostgreSQL ")
    assert set(result["pgbench_script"]) >= {"current", "service_statements"}

    assert set(result["scenarios"]) == SCENARIOS
    for key, scenario in result["scenarios"].items():
        postgres = scenario["backend"] == "postgresql"
        assert scenario["servers"] == (3 if key.startswith("c-") else 1)
        assert scenario["points"], key
        for point in scenario["points"]:
            what = f"{key} @{point['concurrency']}"
            _check_run(point["query"], f"{what} query", {"query", "ReserveCredit", "Commit"})
            _check_run(point["noop"], f"{what} noop", {"query", "Health.Check"})
            _check_run(point["check"], f"{what} check", {"CheckAccess"})
            assert point["ratios"]["to_noop"] > 0
            stream = point["stream"]
            _check_run(stream, f"{what} stream", {"query", "ReserveCredit", "ExtendHold", "Commit"})
            assert stream["extensions_per_query"] == 2
            assert stream["rpcs_per_query"] == 4
            # Every query took a hold and extended it twice (warm-up included).
            assert (
                stream["rpcs_by_method_with_warmup"]["ExtendHold"]
                == 2 * (stream["rpcs_by_method_with_warmup"]["ReserveCredit"])
            )
            assert point["ratios"]["stream_to_noop"] > 0
            assert point["ratios"]["stream_rpcs_to_noop_rpcs"] > 0
            assert point["ratios"]["stream_to_query"] > 0
            if postgres:
                db = point["query"]["db"]
                assert db["statements_per_rpc"] > 0
                assert db["transactions_per_rpc"] >= 0
                assert stream["db"]["statements_per_rpc"] > 0
                pgbench = point["pgbench"]
                assert pgbench["transactions"] > 0
                assert pgbench["failed_transactions"] == 0
                assert pgbench["invariants"]["ok"] is True
                assert point["ratios"]["to_pgbench"] > 0
            else:
                assert "pgbench" not in point
                assert "db" not in point["query"]
    ratios = {(row["topology"], row["concurrency"]) for row in result["hot_to_spread"]}
    assert len(ratios) == 3 * len(result["config"]["concurrency"])

    big = result["big_ledger"]
    assert big["bulk_load"]["ledger_rows_added"] == result["config"]["big_ledger_rows"]
    for run in (big["empty"], big["big"]):
        _check_run(run, "big ledger", {"ReserveCredit"})
    assert big["ratio_p50"] > 0
    dash = result["dashboard_summary"]
    assert dash["measurable"] is True
    assert dash["records"]["dash-big"] == 2_000
    assert dash["invariants"]["ok"] is True
    assert dash["small"]["calls"] > 0
    assert dash["big"]["calls"] > 0
    assert dash["ratio_p50"] > 0
    assert dash["commit_rollup_cost"]["ratio_mean"] > 0
    assert "pk_usage_rollups" in dash["explain"]
    assert any(t["target"].startswith("summary read") for t in result["targets"])


def test_the_sqlite_core_measure_counts_its_hops(tmp_path: Path) -> None:
    from bench.sqlite_core import measure

    result = asyncio.run(measure(tmp_path, 5))
    # ReserveCredit and Commit are each one transaction on SQLite, each one hop to the single
    # writer's thread and none to aiosqlite's; CPU is spent, and nothing is asserted about how
    # much.
    assert result["writer_hops_per_query"] == 2
    assert result["aiosqlite_hops_per_query"] == 0
    assert result["cpu_ms_per_query"] > 0
    assert result["cpu_ms_per_bare_hop"] > 0
