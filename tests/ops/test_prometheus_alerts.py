"""A real Prometheus scrapes real billing servers and evaluates the shipped alerting rules;
stopping a database makes the alert that describes it fire, and starting it again resolves it.

Two replicas share the job: the first on one PostgreSQL, the second on another. Stopping the
second's makes it alone not ready (BillingReplicaNotReady for it, not BillingDatabaseUnavailable);
stopping the first's too makes no replica ready (BillingDatabaseUnavailable, and
BillingReplicaNotReady resolves). The rules are the file as shipped with only their `for:`
durations shortened to seconds, so that the test takes seconds, not minutes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ops.conftest import UNIT_PRICES
from tests.ops.test_alert_rules import RULES
from tests.support.ports import free_port
from tests.support.postgres import PostgresServer
from tests.support.prometheus import JOB, PrometheusServer
from tests.support.server_process import start_together

pytestmark = pytest.mark.slow

NAMESPACE = "alerts-test"
WAIT_S = 60.0


@pytest.fixture
def two_postgres() -> Iterator[tuple[PostgresServer, PostgresServer]]:
    with PostgresServer() as first, PostgresServer() as second:
        yield first, second


def shortened_rules() -> dict[str, Any]:
    rules: dict[str, Any] = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "2s"
    return rules


def test_stopping_the_database_fires_the_alert_that_describes_it(
    two_postgres: tuple[PostgresServer, PostgresServer], tmp_path: Path
) -> None:
    first_db, second_db = two_postgres
    prices = tmp_path / "prices.toml"
    prices.write_text(UNIT_PRICES)

    def settings(database: PostgresServer, name: str) -> dict[str, str]:
        return {
            "BILLING_DATABASE_URL": database.create_database(name),
            "BILLING_LISTEN_ADDRESS": "127.0.0.1:0",
            "BILLING_PRICE_TABLE": str(prices),
            "BILLING_METRICS_HOST": "127.0.0.1",
            "BILLING_METRICS_PORT": str(free_port()),
            "BILLING_HEALTH_CHECK_INTERVAL_S": "0.2",
        }

    first_settings = settings(first_db, "alerts_first")
    second_settings = settings(second_db, "alerts_second")
    targets = [f"127.0.0.1:{s['BILLING_METRICS_PORT']}" for s in (first_settings, second_settings)]
    second_instance = targets[1]
    (tmp_path / "prometheus").mkdir()
    with (
        start_together(first_settings, second_settings),
        PrometheusServer(
            tmp_path / "prometheus", targets, shortened_rules(), labels={"namespace": NAMESPACE}
        ) as prometheus,
    ):
        group = {"namespace": NAMESPACE, "job": JOB}
        prometheus.wait_for(lambda: prometheus.targets_up() == 2, WAIT_S, "two targets up")
        prometheus.wait_for(
            lambda: len(prometheus.query("billing_ready == 1")) == 2,
            WAIT_S,
            "both replicas ready in Prometheus",
        )
        assert prometheus.alerts() == []

        second_db.pause()
        try:
            (not_ready,) = prometheus.wait_for(
                lambda: prometheus.firing("BillingReplicaNotReady"), WAIT_S, "ReplicaNotReady"
            )
            assert not_ready == {
                **group,
                "alertname": "BillingReplicaNotReady",
                "instance": second_instance,
                "severity": "warning",
            }
            assert prometheus.firing("BillingDatabaseUnavailable") == []

            first_db.pause()
            try:
                (unavailable,) = prometheus.wait_for(
                    lambda: prometheus.firing("BillingDatabaseUnavailable"),
                    WAIT_S,
                    "DatabaseUnavailable",
                )
                assert unavailable == {
                    **group,
                    "alertname": "BillingDatabaseUnavailable",
                    "severity": "critical",
                }
                # No replica is ready: the one alert says so, the per-replica one resolves.
                prometheus.wait_for(
                    lambda: not prometheus.firing("BillingReplicaNotReady"),
                    WAIT_S,
                    "ReplicaNotReady resolved",
                )
            finally:
                first_db.resume()
        finally:
            second_db.resume()
        prometheus.wait_for(lambda: prometheus.alerts() == [], WAIT_S, "every alert resolved")
