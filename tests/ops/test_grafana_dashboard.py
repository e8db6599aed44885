"""The Grafana dashboard (deploy/monitoring/billing.grafana-dashboard.json): generated from its
source, read back by Grafana's foundation SDK, laid out without overlaps, and every query valid
PromQL (promtool) over metrics the service exports or the rules record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard

from tests.ops.test_alert_rules import promtool, rules
from tests.support.metric_names import exported_metric_names, metric_names_in
from tests.support.tools import REPO

SOURCE = REPO / "deploy" / "monitoring" / "dashboard.py"
DASHBOARD = REPO / "deploy" / "monitoring" / "billing.grafana-dashboard.json"


def dashboard_json() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard_json()["panels"] if panel["type"] != "row"]


def expressions() -> list[str]:
    return [target["expr"] for panel in panels() for target in panel["targets"]]


def test_the_committed_dashboard_is_the_one_its_source_builds() -> None:
    check = subprocess.run(
        [sys.executable, str(SOURCE), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert check.returncode == 0, check.stderr


def test_grafanas_sdk_reads_it_back() -> None:
    register_default_plugins()
    model = Dashboard.from_json(dashboard_json())
    assert model.title == "ai-billing"
    assert model.panels is not None
    assert len(model.panels) == len(dashboard_json()["panels"])


def test_it_shows_what_operators_need() -> None:
    titles = {panel["title"] for panel in panels()}
    for needed in (
        "Decisions by reason",
        "Credit held",
        "Charges by outcome",
        "Latency by method (p50, p99)",
        "Calls by method and status",
        "Replicas ready",
    ):
        assert needed in titles


def test_every_panel_queries_prometheus_through_the_chosen_datasource() -> None:
    ids = [panel["id"] for panel in dashboard_json()["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["type"] in {"timeseries", "stat"}
        assert panel["targets"], panel["title"]
        assert panel["description"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert all(ref_ids), panel["title"]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_no_two_panels_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard_json()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, panel["title"]
        taken |= cells


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    # Grafana's variables, as Grafana would substitute them.
    substituted = [
        expression.replace("$__rate_interval", "5m").replace("$job", ".*")
        for expression in expressions()
    ]
    checked = tmp_path / "dashboard-queries.rules.yaml"
    checked.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "dashboard",
                        "rules": [
                            {"record": f"dashboard:query_{number}", "expr": expression}
                            for number, expression in enumerate(substituted)
                        ],
                    }
                ]
            }
        )
    )
    result = promtool("check", "rules", str(checked))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("expression", expressions())
def test_every_query_reads_an_exported_or_recorded_metric(expression: str, tmp_path: Path) -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    used = metric_names_in(expression)
    assert used or any(name in expression for name in recorded)
    assert used <= exported_metric_names(tmp_path)
