"""`billing-service` as a user runs it: zero-configuration serve, migrate, config errors."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.cli import run_cli
from tests.support.server_process import ServerProcess


def test_serve_without_configuration_listens_on_50051_with_a_sqlite_file(tmp_path: Path) -> None:
    with ServerProcess({}, cwd=tmp_path) as server:
        assert server.address == "127.0.0.1:50051"
        assert (tmp_path / "billing.db").exists()
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            answer = health.Check(
                health_pb2.HealthCheckRequest(service="billing.v1.BillingService")
            )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert server.terminate() == 0


def test_migrate_creates_the_schema_and_is_repeatable(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    for _ in range(2):
        result = run_cli("migrate", cwd=tmp_path, BILLING_DATABASE_URL=url)
        assert result.returncode == 0, result.stderr
        assert "up to date" in result.stdout
    assert (tmp_path / "fresh.db").exists()


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"BILLING_PRICE_TABLE": "/nonexistent/prices.toml"}, "/nonexistent/prices.toml"),
        ({"BILLING_DEFAULT_CREDIT_LIMIT_MICROS": "-1"}, "BILLING_DEFAULT_CREDIT_LIMIT_MICROS"),
        ({"BILLING_DATABASE_URL": "mysql://db/billing"}, "BILLING_DATABASE_URL"),
        ({"BILLING_DATABASE_URL": "not a url"}, "BILLING_DATABASE_URL"),
        ({"BILLING_HOLD_TTL_DEFAULT_S": "7200"}, "BILLING_HOLD_TTL"),
    ],
)
def test_a_configuration_error_stops_the_start_with_one_clear_line(
    tmp_path: Path, settings: dict[str, str], named: str
) -> None:
    result = run_cli("serve", cwd=tmp_path, **settings)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("billing-service: ")
    assert named in lines[0]


def test_an_invalid_price_table_names_the_model_and_field(tmp_path: Path) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text('[models."gpt-x"]\nbilling = "metered"\noutput_micros_per_mtok = 2.5\n')
    result = run_cli("check-config", cwd=tmp_path, BILLING_PRICE_TABLE=str(prices))
    assert result.returncode == 2
    assert "models.gpt-x.output_micros_per_mtok" in result.stderr
