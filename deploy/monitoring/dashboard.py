"""The Grafana dashboard of ai-billing, built with Grafana's foundation SDK (the dashboard's one
source): `.venv/bin/python deploy/monitoring/dashboard.py` writes billing.grafana-dashboard.json
beside it; `--check` fails when that file is stale (tests/ops/test_dashboard.py runs it).

Every query reads the metrics of docs/deployment.md ("Observability") and the recording rule of
deploy/prometheus/billing.rules.yaml, for the billing jobs picked by the `job` variable.
Database-wide gauges (holds open, the charge outbox) are read by every replica: max, not sum.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grafana_foundation_sdk.builders.common import StackingConfig
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import StackingMode
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

OUTPUT = Path(__file__).with_name("billing.grafana-dashboard.json")
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
JOB = 'job=~"$job"'
RATE = "[$__rate_interval]"


def query(expression: str, legend: str = "") -> Dataquery:
    built = Dataquery().expr(expression).datasource(DATASOURCE)
    return built.legend_format(legend) if legend else built


def timeseries(title: str, description: str, unit: str, *queries: Dataquery) -> Timeseries:
    panel = (
        Timeseries()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(8)
        .span(12)
    )
    for each in queries:
        panel = panel.with_target(each)
    return panel


def stacked(panel: Timeseries) -> Timeseries:
    return panel.stacking(StackingConfig().mode(StackingMode.NORMAL)).fill_opacity(30)


def build() -> Dashboard:
    return (
        Dashboard("ai-billing")
        .uid("ai-billing")
        .description("Calls, decisions, credit, charges and the database of ai-billing.")
        .tags(["ai-billing"])
        .refresh("30s")
        .time("now-6h", "now")
        .with_variable(DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(
            QueryVariable("job")
            .label("Job")
            .datasource(DATASOURCE)
            .query("label_values(billing_ready, job)")
            .refresh(VariableRefresh.ON_DASHBOARD_LOAD)
            .multi(True)
            .include_all(True)
        )
        .with_row(Row("Calls"))
        .with_panel(
            Stat()
            .title("Replicas ready")
            .description(
                "Replicas whose readiness is SERVING (the database reachable, "
                "writable and migrated), of those scraped."
            )
            .datasource(DATASOURCE)
            .height(8)
            .span(4)
            .with_target(query(f"sum(billing_ready{{{JOB}}})", "ready"))
            .with_target(query(f"count(billing_ready{{{JOB}}})", "replicas"))
        )
        .with_panel(
            timeseries(
                "Calls by method and status",
                "Answers per second, refusals included.",
                "reqps",
                query(
                    "sum by (grpc_method, grpc_code) "
                    f"(rate(grpc_server_handled_total{{{JOB}}}{RATE}))",
                    "{{grpc_method}} {{grpc_code}}",
                ),
            ).span(10)
        )
        .with_panel(
            timeseries(
                "Latency by method (p50, p99)",
                "Time from receiving a call to answering it.",
                "s",
                *(
                    query(
                        f"histogram_quantile({quantile}, sum by (grpc_method, le) "
                        f"(rate(grpc_server_handling_seconds_bucket{{{JOB}}}{RATE})))",
                        f"{{{{grpc_method}}}} p{int(quantile * 100)}",
                    )
                    for quantile in (0.5, 0.99)
                ),
            ).span(10)
        )
        .with_row(Row("Decisions"))
        .with_panel(
            stacked(
                timeseries(
                    "Decisions by reason",
                    "CheckAccess and ReserveCredit answers per second: ALLOWED or the denial "
                    "reason.",
                    "reqps",
                    query(
                        f"sum by (decision) (rate(billing_decisions_total{{{JOB}}}{RATE}))",
                        "{{decision}}",
                    ),
                )
            )
        )
        .with_panel(
            timeseries(
                "Denials' share by reason",
                "Each denial reason's share of the answers over 10 minutes (the recording "
                "rule BillingDenialsJumping watches).",
                "percentunit",
                query(
                    f'billing:decisions:ratio_rate10m{{{JOB}, decision!="ALLOWED"}}',
                    "{{decision}}",
                ),
            )
        )
        .with_row(Row("Credit"))
        .with_panel(
            timeseries(
                "Credit held",
                "Micros held by open holds, database-wide. Available credit is per tenant "
                "(`billingctl credit summary`, the tenant's balance), not a metric.",
                "none",
                query(f"max(billing_holds_open_micros{{{JOB}}})", "held micros"),
            )
        )
        .with_panel(
            timeseries(
                "Open holds and expiries",
                "Open holds, database-wide, and holds released per second because they "
                "expired (callers that never committed or released).",
                "none",
                query(f"max(billing_holds_open{{{JOB}}})", "open holds"),
                query(f"sum(rate(billing_holds_expired_total{{{JOB}}}{RATE}))", "expired / s"),
            )
        )
        .with_panel(
            timeseries(
                "Credit moved",
                "Micros per second reserved, committed (charged), uncollected, released, "
                "refunded and granted, read off the answers (the ledger is the record).",
                "none",
                *(
                    query(f"sum(rate(billing_{kind}_micros_total{{{JOB}}}{RATE}))", kind)
                    for kind in (
                        "reserved",
                        "committed",
                        "uncollected",
                        "released",
                        "refunded",
                        "granted",
                    )
                ),
            ).span(24)
        )
        .with_row(Row("Payments"))
        .with_panel(
            stacked(
                timeseries(
                    "Charges by outcome",
                    "Stripe charges finished per second, by outcome and what triggered them.",
                    "ops",
                    query(
                        f"sum by (trigger, outcome) (rate(billing_charges_total{{{JOB}}}{RATE}))",
                        "{{trigger}} {{outcome}}",
                    ),
                )
            )
        )
        .with_panel(
            timeseries(
                "Charge outbox",
                "Charges waiting to be sent, the oldest one's wait (right axis in seconds), "
                "and charges waiting for an operator; database-wide.",
                "none",
                query(f"max(billing_charges_pending{{{JOB}}})", "pending"),
                query(f"max(billing_charge_oldest_pending_seconds{{{JOB}}})", "oldest (s)"),
                query(f"max(billing_charges_needing_operator{{{JOB}}})", "needing an operator"),
            )
        )
        .with_panel(
            stacked(
                timeseries(
                    "Stripe webhook deliveries",
                    "Deliveries per second by outcome: applied, duplicate, ignored, rejected "
                    "(400), failed (5xx, Stripe redelivers).",
                    "reqps",
                    query(
                        f"sum by (outcome) (rate(billing_webhook_events_total{{{JOB}}}{RATE}))",
                        "{{outcome}}",
                    ),
                )
            ).span(24)
        )
        .with_row(Row("Database"))
        .with_panel(
            timeseries(
                "Connection pools",
                "Connections of all replicas in use and idle, and their limit.",
                "none",
                query(f"sum by (state) (billing_db_pool_connections{{{JOB}}})", "{{state}}"),
                query(f"sum(billing_db_pool_max_connections{{{JOB}}})", "limit"),
            )
        )
        .with_panel(
            timeseries(
                "Books audit",
                "Tenants whose balance, held amount or budget periods disagree with the ledger "
                "(must be 0), and tenants over a credit limit an operator lowered; as of the "
                "last audit, database-wide.",
                "none",
                query(f"max(billing_books_audit_tenants_disagreeing{{{JOB}}})", "disagreeing"),
                query(
                    f"max(billing_books_audit_tenants_over_credit_limit{{{JOB}}})",
                    "over the credit limit",
                ),
            )
        )
        .with_panel(
            timeseries(
                "Calls answered UNAVAILABLE",
                "Calls the service could not serve (database faults, exhausted pools, "
                "draining); clients retry them with the same request_id.",
                "reqps",
                query(
                    "sum by (grpc_method) (rate(grpc_server_handled_total"
                    f'{{{JOB}, grpc_code="UNAVAILABLE"}}{RATE}))',
                    "{{grpc_method}}",
                ),
            )
        )
    )


def render() -> str:
    dashboard = build().build()
    # Stable ids and query letters, as Grafana would give them on saving.
    for number, panel in enumerate(dashboard.panels or [], start=1):
        panel.id_val = number
        for letter, target in zip(
            "ABCDEFGHIJ", getattr(panel, "targets", None) or [], strict=False
        ):
            target.ref_id = letter
    return JSONEncoder(sort_keys=True, indent=2).encode(dashboard) + "\n"


def main(arguments: list[str]) -> int:
    rendered = render()
    if arguments == ["--check"]:
        if OUTPUT.read_text() != rendered:
            print(f"{OUTPUT} is stale: run {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
