"""The alerting rules (deploy/prometheus/billing.rules.yaml), checked by Prometheus's own
promtool: valid, and for every alert series that fire it and series that do not
(billing.rules.test.yaml). The PrometheusRule manifest holds the same rules; every alert has a
runbook; every metric a rule reads is one the service exports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.metric_names import exported_metric_names, metric_names_in
from tests.support.tools import REPO, tool

RULES = REPO / "deploy" / "prometheus" / "billing.rules.yaml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "billing.rules.test.yaml"
PROMETHEUS_RULE = REPO / "deploy" / "monitoring" / "billing.prometheusrule.yaml"
RUNBOOKS = REPO / "docs" / "runbooks.md"
RUNBOOK_BASE = "https://github.com/example/ai-billing/blob/main/docs/runbooks.md#"


def promtool(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=REPO,
    )


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in rules() if "alert" in rule}


def test_promtool_finds_the_rules_valid() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    broken = tmp_path / "broken.rules.yaml"
    broken.write_text(RULES.read_text().replace("max by (namespace, job) (", "max by (", 1))
    assert promtool("check", "rules", str(broken)).returncode != 0


def test_every_alert_fires_and_stays_quiet_as_its_unit_tests_expect() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == set(alerts())
    assert quiet == set(alerts())


def test_promtool_fails_a_unit_test_whose_alert_does_not_fire(tmp_path: Path) -> None:
    (tmp_path / "billing.rules.yaml").write_text(
        RULES.read_text().replace("billing_ready) == 0", "billing_ready) == 2", 1)
    )
    unit_tests = yaml.safe_load(RULE_TESTS.read_text())
    unit_tests["tests"] = unit_tests["tests"][:1]  # the case where it fires
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(unit_tests))
    assert promtool("test", "rules", str(tmp_path / "tests.yaml")).returncode != 0


def test_the_prometheusrule_manifest_holds_the_same_rules() -> None:
    check = subprocess.run(
        ["bash", str(REPO / "scripts" / "generate-prometheusrule"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    manifest = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == (
        "monitoring.coreos.com/v1",
        "PrometheusRule",
    )
    assert manifest["spec"] == yaml.safe_load(RULES.read_text())


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_has_a_severity_a_summary_and_a_runbook_section() -> None:
    sections = {
        _anchor(line[3:]) for line in RUNBOOKS.read_text().splitlines() if line.startswith("## ")
    }
    linked = set()
    for name, rule in alerts().items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert annotations["summary"], name
        assert annotations["description"], name
        url = annotations["runbook_url"]
        assert url.startswith(RUNBOOK_BASE), name
        linked.add(url.removeprefix(RUNBOOK_BASE))
    assert linked == sections  # every alert's section exists, and no section is left over


@pytest.mark.parametrize("rule", rules(), ids=lambda rule: rule.get("alert") or rule["record"])
def test_every_metric_a_rule_reads_is_exported(rule: dict[str, Any], tmp_path: Path) -> None:
    used = metric_names_in(rule["expr"])
    recorded = {other["record"] for other in rules() if "record" in other}
    assert used or any(name in rule["expr"] for name in recorded)
    assert used <= exported_metric_names(tmp_path)
