"""The server as operators run it (a child process): JSON logs with the call's context and no
secrets, optional OpenTelemetry spans, and one clear line for each configuration error."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from billing.v1 import admin_pb2, admin_pb2_grpc, billing_pb2, billing_pb2_grpc, types_pb2
from tests.ops.conftest import UNIT_PRICES
from tests.support.certs import CertificateAuthority
from tests.support.cli import run_cli
from tests.support.ports import free_port
from tests.support.postgres import PostgresServer
from tests.support.server_process import ServerProcess

CHAT_TOKEN = "chat-secret-token-7d1e0c55aa"
OPERATOR_TOKEN = "operator-secret-token-92bb04e1"
DB_PASSWORD = "db-password-5f0a9c"


def rid() -> str:
    return str(uuid.uuid4())


def test_logs_are_json_with_the_calls_context_and_no_secrets(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    # The throwaway server trusts every local connection, so any password is accepted.
    url = postgres_server.create_database("json_logs").replace(
        "postgres@", f"postgres:{DB_PASSWORD}@"
    )
    prices = tmp_path / "prices.toml"
    prices.write_text(UNIT_PRICES)
    settings = {
        "BILLING_DATABASE_URL": url,
        "BILLING_LISTEN_ADDRESS": "127.0.0.1:0",
        "BILLING_PRICE_TABLE": str(prices),
        "BILLING_AUTH_TOKENS": f"chat-service={CHAT_TOKEN},operator={OPERATOR_TOKEN}",
    }
    with ServerProcess(settings) as server:
        with grpc.insecure_channel(server.address) as channel:
            operator = [("authorization", f"Bearer {OPERATOR_TOKEN}")]
            chat = [("authorization", f"Bearer {CHAT_TOKEN}")]
            admin_pb2_grpc.AdminServiceStub(channel).CreateTenant(
                admin_pb2.CreateTenantRequest(
                    request_id="create-acme", tenant_id="acme", payment_method_on_file=True
                ),
                metadata=operator,
            )
            billing = billing_pb2_grpc.BillingServiceStub(channel)
            reserved = billing.ReserveCredit(
                billing_pb2.ReserveCreditRequest(
                    request_id="reserve-1",
                    tenant_id="acme",
                    user_id="u",
                    model="unit-priced",
                    amount_micros=100,
                ),
                metadata=chat,
            )
            billing.Commit(
                billing_pb2.CommitRequest(
                    request_id="commit-1",
                    reservation_id=reserved.reservation.reservation_id,
                    usage=types_pb2.TokenUsage(output_tokens=50),
                ),
                metadata=chat,
            )
            with pytest.raises(grpc.RpcError):
                admin_pb2_grpc.AdminServiceStub(channel).GetTenant(
                    admin_pb2.GetTenantRequest(tenant_id="acme"),
                    metadata=[("authorization", f"Bearer {CHAT_TOKEN}x")],
                )
        server.wait_for_log(r'"request_id": "commit-1"')
        assert server.terminate() == 0

    lines = [json.loads(line) for line in server.log if line.startswith("{")]
    assert len(lines) >= 5
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys()
    access_lines = [line for line in lines if line["logger"] == "billing_service.access"]
    access = {line["request_id"]: line for line in access_lines if "request_id" in line}
    assert access["reserve-1"]["method"] == "billing.v1.BillingService/ReserveCredit"
    assert access["reserve-1"]["tenant_id"] == "acme"
    assert access["reserve-1"]["grpc_code"] == "OK"
    assert access["reserve-1"]["caller"].startswith("chat-service token ")
    # Commit names only the reservation: the tenant comes from the answer.
    assert access["commit-1"]["tenant_id"] == "acme"
    assert access["create-acme"]["caller"].startswith("operator token ")
    refused = [line for line in lines if line.get("grpc_code") == "UNAUTHENTICATED"]
    assert len(refused) == 1
    everything = "".join(server.log)
    for secret in (CHAT_TOKEN, OPERATOR_TOKEN, DB_PASSWORD):
        assert secret not in everything


def _access_lines(server: ServerProcess) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in server.log if line.startswith("{")]
    return [line for line in lines if line["logger"] == "billing_service.access"]


def test_access_lines_carry_the_denial_reason_and_the_error_reason(tmp_path: Path) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text(UNIT_PRICES)
    settings = {
        "BILLING_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}",
        "BILLING_LISTEN_ADDRESS": "127.0.0.1:0",
        "BILLING_PRICE_TABLE": str(prices),
        "BILLING_LOG_FORMAT": "json",
    }
    with ServerProcess(settings) as server:
        with grpc.insecure_channel(server.address) as channel:
            billing = billing_pb2_grpc.BillingServiceStub(channel)
            admin_pb2_grpc.AdminServiceStub(channel).CreateTenant(
                admin_pb2.CreateTenantRequest(
                    request_id="create", tenant_id="acme", payment_method_on_file=True
                )
            )
            billing.ReserveCredit(
                billing_pb2.ReserveCreditRequest(
                    request_id="too-big",
                    tenant_id="acme",
                    user_id="u",
                    model="unit-priced",
                    amount_micros=10**12,
                )
            )
            billing.CheckAccess(billing_pb2.CheckAccessRequest(tenant_id="acme", model="nope"))
            reserved = billing.ReserveCredit(
                billing_pb2.ReserveCreditRequest(
                    request_id="fits",
                    tenant_id="acme",
                    user_id="u",
                    model="unit-priced",
                    amount_micros=100,
                )
            )
            for request_id in ("commit-1", "commit-2"):
                commit = billing_pb2.CommitRequest(
                    request_id=request_id,
                    reservation_id=reserved.reservation.reservation_id,
                    usage=types_pb2.TokenUsage(output_tokens=50),
                )
                if request_id == "commit-2":
                    with pytest.raises(grpc.RpcError):
                        billing.Commit(commit)
                else:
                    billing.Commit(commit)
            with pytest.raises(grpc.RpcError):
                billing.ReserveCredit(
                    billing_pb2.ReserveCreditRequest(
                        request_id="bad-model", tenant_id="acme", user_id="u", amount_micros=1
                    )
                )
        server.wait_for_log(r'"request_id": "bad-model"')
        assert server.terminate() == 0

    access = {line.get("request_id", line["method"]): line for line in _access_lines(server)}
    denied = access["too-big"]
    assert denied["grpc_code"] == "OK"
    assert denied["denial_reason"] == "DENIAL_REASON_CREDIT_LIMIT_REACHED"
    assert "DENIAL_REASON_CREDIT_LIMIT_REACHED" in denied["message"]
    advice = access["billing.v1.BillingService/CheckAccess"]
    assert advice["denial_reason"] == "DENIAL_REASON_MODEL_NOT_OFFERED"
    assert "denial_reason" not in access["fits"]
    assert "error_reason" not in access["commit-1"]
    failed = access["commit-2"]
    assert failed["grpc_code"] == "FAILED_PRECONDITION"
    assert failed["error_reason"] == "HOLD_ALREADY_COMMITTED"
    assert "HOLD_ALREADY_COMMITTED" in failed["message"]
    invalid = access["bad-model"]
    assert (invalid["grpc_code"], invalid["error_reason"]) == ("INVALID_ARGUMENT", "FIELD_INVALID")
    assert invalid["field"] == "model"


HUGE = 300_000  # two such ids fit in one message (1 MiB by default)


def test_values_from_a_request_are_logged_only_after_authentication_and_capped(
    tmp_path: Path,
) -> None:
    settings = {
        "BILLING_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}",
        "BILLING_LISTEN_ADDRESS": "127.0.0.1:0",
        "BILLING_AUTH_TOKENS": f"chat-service={CHAT_TOKEN}",
        "BILLING_LOG_FORMAT": "json",
        "BILLING_LOG_LEVEL": "DEBUG",
    }
    chat = [("authorization", f"Bearer {CHAT_TOKEN}")]
    huge_tenant, huge_request = "t" * HUGE, "r" * HUGE
    with ServerProcess(settings) as server:
        with grpc.insecure_channel(server.address) as channel:
            billing = billing_pb2_grpc.BillingServiceStub(channel)
            for metadata in ([], chat):  # refused before authentication; then invalid
                with pytest.raises(grpc.RpcError):
                    billing.ReserveCredit(
                        billing_pb2.ReserveCreditRequest(
                            request_id=huge_request,
                            tenant_id=huge_tenant,
                            user_id="u",
                            model="gpt-4o",
                            amount_micros=1,
                        ),
                        metadata=metadata,
                    )
            billing.CheckAccess(
                billing_pb2.CheckAccessRequest(tenant_id="acme", model="gpt-4o"), metadata=chat
            )
        server.wait_for_log(r'"tenant_id": "acme"')
        assert server.terminate() == 0

    longest = max(len(line) for line in server.log)
    assert longest < 2_000
    lines = [json.loads(line) for line in server.log if line.startswith("{")]
    calls = [
        line for line in lines if line.get("method") == "billing.v1.BillingService/ReserveCredit"
    ]
    refused = [line for line in calls if line.get("grpc_code") == "UNAUTHENTICATED"]
    assert len(refused) == 1
    before_authentication = calls[: calls.index(refused[0]) + 1]
    for line in before_authentication:
        assert "tenant_id" not in line
        assert "request_id" not in line
    invalid = [line for line in calls if line.get("grpc_code") == "INVALID_ARGUMENT"]
    assert invalid[0]["field"] == "request_id"
    for line in calls:
        assert len(line.get("tenant_id", "")) <= 128
        assert len(line.get("request_id", "")) <= 128


def test_tracing_exports_a_span_per_call(tmp_path: Path) -> None:
    settings = {
        "BILLING_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}",
        "BILLING_LISTEN_ADDRESS": "127.0.0.1:0",
        "BILLING_TRACING": "console",
    }
    with ServerProcess(settings, capture_stdout=True) as server:
        with grpc.insecure_channel(server.address) as channel:
            billing_pb2_grpc.BillingServiceStub(channel).CheckAccess(
                billing_pb2.CheckAccessRequest(tenant_id="acme", model="gpt-4o")
            )
        assert server.terminate() == 0  # flushes the spans
    spans = _console_spans("".join(server.stdout))
    names = [span["name"] for span in spans]
    assert names == ["/billing.v1.BillingService/CheckAccess"]
    assert spans[0]["resource"]["attributes"]["service.name"] == "ai-billing"


def _console_spans(text: str) -> list[dict[str, Any]]:
    """The JSON objects the console exporter printed, one after another."""
    decoder = json.JSONDecoder()
    spans, index = [], 0
    while (start := text.find("{", index)) != -1:
        span, index = decoder.raw_decode(text, start)
        spans.append(span)
    return spans


@pytest.fixture(scope="module")
def pem_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("pem")
    certificate, key = CertificateAuthority().server().write(directory, "server")
    not_pem = directory / "not.pem"
    not_pem.write_text("hello")
    return {"cert": str(certificate), "key": str(key), "not_pem": str(not_pem)}


SHORT_TOKEN = "tooshort"
LONG_TOKEN = "a-long-enough-token-0123456789"

CONFIG_ERRORS: list[tuple[dict[str, str], str]] = [
    ({"BILLING_AUTH_TOKENS": f"chat-service={SHORT_TOKEN}"}, "BILLING_AUTH_TOKENS: entry 1"),
    ({"BILLING_AUTH_TOKENS": f"admin={LONG_TOKEN}"}, "unknown role"),
    ({"BILLING_AUTH_TOKENS": LONG_TOKEN}, "not role=value"),
    (
        {"BILLING_AUTH_TOKENS": f"operator={LONG_TOKEN},chat-service={LONG_TOKEN}"},
        "two roles",
    ),
    ({"BILLING_AUTH_TOKENS_FILE": "/nonexistent/tokens"}, "BILLING_AUTH_TOKENS_FILE"),
    ({"BILLING_TLS_CERT_FILE": "{cert}"}, "BILLING_TLS_KEY_FILE"),
    (
        {"BILLING_TLS_CERT_FILE": "{not_pem}", "BILLING_TLS_KEY_FILE": "{key}"},
        "BILLING_TLS_CERT_FILE",
    ),
    (
        {
            "BILLING_TLS_CERT_FILE": "{cert}",
            "BILLING_TLS_KEY_FILE": "{key}",
            "BILLING_TLS_CLIENT_CA_FILE": "{cert}",
        },
        "BILLING_TLS_CLIENT_ROLES",
    ),
    ({"BILLING_TLS_CLIENT_ROLES": "operator=ops"}, "BILLING_TLS_CLIENT_CA_FILE"),
    ({"BILLING_LOG_LEVEL": "LOUD"}, "BILLING_LOG_LEVEL"),
    ({"BILLING_LOG_FORMAT": "xml"}, "BILLING_LOG_FORMAT"),
    ({"BILLING_TRACING": "jaeger"}, "BILLING_TRACING"),
    ({"BILLING_METRICS_PORT": "70000"}, "BILLING_METRICS_PORT"),
    ({"BILLING_MAX_MESSAGE_BYTES": "10"}, "BILLING_MAX_MESSAGE_BYTES"),
    ({"BILLING_KEEPALIVE_TIME_S": "0"}, "BILLING_KEEPALIVE_TIME_S"),
    ({"BILLING_PAGE_TOKEN_SECRET": "too-short"}, "BILLING_PAGE_TOKEN_SECRET"),
    ({"BILLING_PAGE_TOKEN_SECRET_FILE": "/nonexistent/key"}, "BILLING_PAGE_TOKEN_SECRET_FILE"),
    (
        {"BILLING_PAGE_TOKEN_SECRET": "k" * 32, "BILLING_PAGE_TOKEN_SECRET_FILE": "{cert}"},
        "BILLING_PAGE_TOKEN_SECRET_FILE",
    ),
]


@pytest.mark.parametrize(("settings", "named"), CONFIG_ERRORS)
def test_a_security_or_transport_setting_error_is_one_clear_line(
    tmp_path: Path, pem_files: dict[str, str], settings: dict[str, str], named: str
) -> None:
    settings = {key: value.format(**pem_files) for key, value in settings.items()}
    result = run_cli("check-config", cwd=tmp_path, **settings)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("billing-service: ")
    assert named in lines[0]
    for secret in (SHORT_TOKEN, LONG_TOKEN):
        assert secret not in result.stderr


def test_an_unreachable_database_stops_the_start_with_one_line(tmp_path: Path) -> None:
    url = f"postgresql+asyncpg://billing:{DB_PASSWORD}@127.0.0.1:{free_port()}/billing"
    result = run_cli("serve", cwd=tmp_path, BILLING_DATABASE_URL=url)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("billing-service: cannot serve: ")
    assert DB_PASSWORD not in result.stderr


def test_a_busy_metrics_port_stops_the_start_with_one_line(tmp_path: Path) -> None:
    with ServerProcess(
        {
            "BILLING_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'a.db'}",
            "BILLING_LISTEN_ADDRESS": "127.0.0.1:0",
            "BILLING_METRICS_PORT": str(port := free_port()),
        }
    ):
        result = run_cli(
            "serve",
            cwd=tmp_path,
            BILLING_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'b.db'}",
            BILLING_LISTEN_ADDRESS="127.0.0.1:0",
            BILLING_METRICS_PORT=str(port),
        )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]  # after the migration's log lines
    assert (
        last == f"billing-service: cannot serve metrics on 127.0.0.1:{port}: Address already in use"
    )
    assert "Traceback" not in result.stderr
