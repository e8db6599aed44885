"""HOOK, NOT MEASURABLE YET: the dashboard summary read with 1,000,000 usage records vs 10.

Issue 4 asks for the latency of the usage-dashboard summary read of one tenant with 10 and with
1,000,000 usage records (target: within 1.5x). billing.v1 has no such RPC yet ("Payment-method
and usage-dashboard services will sit beside these in the same package", README). When it
exists, implement `measure_dashboard_summary` here:

  1. one fresh database and one server (as `Benchmark._big_ledger` in bench/run.py does);
  2. tenant "dash-small" with 10 usage records and "dash-big" with 1,000,000, written in bulk
     with INSERT ... SELECT generate_series: per record one `committed` hold, its `hold` and
     `debit` ledger entries, and the usage_records row, with the tenant's balance equal to minus
     the sum of the charges, so that `check_invariants` stays clean;
  3. VACUUM ANALYZE, then a fixed closed-loop run of the summary RPC (concurrency 1, e.g. 500
     calls) per tenant: add a mode for it in bench/loadgen.py next to "check";
  4. report p50/p99 of both and their ratio; bench/report.py already prints this section.
"""

from __future__ import annotations

from typing import Any


def measure_dashboard_summary() -> dict[str, Any]:
    return {
        "measurable": False,
        "reason": "billing.v1 has no dashboard/usage-summary RPC yet; see bench/dashboard.py",
        "target": "summary read with 1,000,000 usage records within 1.5x of the read with 10",
    }
