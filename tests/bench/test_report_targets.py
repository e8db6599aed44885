"""bench/report.py: the targets of "the hot path at the machine's limit", computed from a run."""

from __future__ import annotations

import json
from pathlib import Path

from bench import report

RUN = Path(__file__).parents[2] / "bench" / "results" / "run-2026-12-04.json"


def test_every_hot_path_target_is_computed_from_the_run_it_reports() -> None:
    result = json.loads(RUN.read_text())
    report.add_ratios_and_targets(result)
    targets = {(t["target"], t["scope"]): t for t in result["targets"]}

    d_hot_16 = result["scenarios"]["d-hot"]["points"][1]
    assert d_hot_16["concurrency"] == 16
    times = targets[(">= 10x the SQLite queries/s of run-2026-11-24b", "d-hot @16")]
    assert times["measured"] == d_hot_16["query"]["queries_per_s"] / 39.0
    assert times["met"] is (times["measured"] >= 10)

    a_64 = next(p for p in result["scenarios"]["a"]["points"] if p["concurrency"] == 64)
    cpu = targets[("PostgreSQL CPU per query <= 0.3 ms at 64 callers", "a")]
    assert cpu["measured"] == report.cpu_ms_per_query(a_64["query"])["postgres"]  # type: ignore[index]
    assert cpu["met"] is False

    ratio = targets[("SQLite: queries/s / no-op >= 0.3 at 16 callers", "d-spread")]
    assert ratio["met"] is (ratio["measured"] >= 0.3)
    one = [t for t in result["targets"] if t["target"].startswith("at 1 caller")]
    assert {t["scope"] for t in one} == {"a", "b"}
    assert "## Targets" in report.markdown(result, "plot.png")
