"""What `billingctl` does when a call fails or is refused: the status, the AIP-193 reason, the
exit code (64 + the gRPC status code; 2 for bad usage), and nothing changed. Tokens and mutual
TLS as the server's ops settings require them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ctl.conftest import Ctl, run_ctl, server_settings
from tests.support.certs import CertificateAuthority
from tests.support.ports import free_port
from tests.support.server_process import ServerProcess

OPERATOR_TOKEN = "operator-token-0123456789abcdef"
CHAT_TOKEN = "chat-token-0123456789abcdef"


def test_unknown_tenant_is_not_found_with_its_reason(ctl: Ctl) -> None:
    result = ctl("tenants", "get", "nobody-here")
    assert result.code == 69  # 64 + NOT_FOUND
    assert result.stdout == ""
    assert result.stderr == (
        "billingctl: NOT_FOUND TENANT_NOT_FOUND: tenant nobody-here does not exist\n"
    )


def test_json_errors_are_json_on_stderr(ctl: Ctl) -> None:
    result = ctl("--json", "credit", "grant", "nobody-here", "--amount", "1", "--reason", "r")
    assert result.code == 69
    error = result.error()
    assert error["code"] == "NOT_FOUND"
    assert error["reason"] == "TENANT_NOT_FOUND"
    assert error["domain"] == "ai-billing"


def test_an_invalid_argument_names_the_field_and_changes_nothing(ctl: Ctl) -> None:
    tenant_id = f"t-{uuid.uuid4().hex[:12]}"
    ctl.ok("tenants", "create", tenant_id)
    result = ctl("credit", "grant", tenant_id, "--amount-micros", "0", "--reason", "r")
    assert result.code == 67  # 64 + INVALID_ARGUMENT
    assert "INVALID_ARGUMENT" in result.stderr
    assert "(field: amount_micros)" in result.stderr
    tenant = ctl.ok("tenants", "get", tenant_id, "--json").json()["tenant"]
    assert tenant["balance"]["balance_micros"] == "0"


def test_unknown_reservation(ctl: Ctl) -> None:
    for command in (["refund", "--all", "--reason", "r"], ["release"]):
        result = ctl(*command, "rsv_" + "0" * 32)
        assert result.code == 69
        assert "NOT_FOUND RESERVATION_NOT_FOUND" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["credit", "grant", "t", "--amount", "1.0000001", "--reason", "r"],  # below a micro
        ["credit", "grant", "t", "--amount", "-1", "--reason", "r"],
        ["credit", "grant", "t", "--amount", "1"],  # no reason
        ["tenants", "update", "t", "--status", "sleeping"],
        ["tenants", "list", "--billing-status", "broke"],
        ["usage", "list", "t", "--since", "yesterday"],
        ["usage", "export", "t"],  # no period
        ["refund"],
        # A refund says what it refunds: an amount, or --all; never neither (that is release).
        ["refund", "rsv_x", "--reason", "r"],
        ["refund", "rsv_x", "--amount-micros", "0", "--reason", "r"],
        ["refund", "rsv_x", "--amount", "0", "--reason", "r"],
        ["refund", "rsv_x", "--all", "--amount", "1", "--reason", "r"],
        ["release"],
        ["--cert-file", "client.crt", "tenants", "get", "t"],  # no --key-file
    ],
)
def test_bad_usage_exits_2_without_calling(args: list[str]) -> None:
    # No server listens there: a call would give 78, not 2.
    result = run_ctl("--target", f"127.0.0.1:{free_port()}", *args)
    assert result.code == 2, result.stderr
    assert "usage: billingctl" in result.stderr


def test_no_server_is_unavailable_and_says_how_to_retry() -> None:
    target = f"127.0.0.1:{free_port()}"
    result = run_ctl(
        "--target",
        target,
        "--request-id",
        "grant-7",
        "credit",
        "grant",
        "t",
        "--amount",
        "1",
        "--reason",
        "r",
    )
    assert result.code == 78  # 64 + UNAVAILABLE
    assert result.stderr.startswith("billingctl: UNAVAILABLE")
    assert "retry with --request-id grant-7" in result.stderr
    scripted = run_ctl("--target", target, "--json", "refund", "rsv_x", "--all", "--reason", "r")
    assert scripted.code == 78
    assert scripted.error()["code"] == "UNAVAILABLE"
    assert scripted.json_stderr()["retry_request_id"].startswith("ctl-")
    # A read has nothing to retry safely.
    read = run_ctl("--target", target, "tenants", "get", "t")
    assert read.code == 78
    assert "--request-id" not in read.stderr


def test_target_from_the_environment(ctl: Ctl) -> None:
    result = run_ctl("tenants", "get", "nobody-here", env={"BILLING_TARGET": ctl.target})
    assert result.code == 69


# Tokens


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tokens = f"operator={OPERATOR_TOKEN}, chat-service={CHAT_TOKEN}"
    settings = server_settings(tmp_path_factory.mktemp("tokens"), BILLING_AUTH_TOKENS=tokens)
    with ServerProcess(settings) as process:
        yield process


def test_the_operator_token_is_sent(token_server: ServerProcess) -> None:
    tenant_id = f"t-{uuid.uuid4().hex[:12]}"
    target = ("--target", token_server.address)
    assert run_ctl(*target, "--token", OPERATOR_TOKEN, "tenants", "create", tenant_id).code == 0
    from_env = run_ctl(*target, "tenants", "get", tenant_id, env={"BILLING_TOKEN": OPERATOR_TOKEN})
    assert from_env.code == 0, from_env.stderr


def test_calls_without_the_operator_role_are_refused(token_server: ServerProcess) -> None:
    target = ("--target", token_server.address)
    missing = run_ctl(*target, "--json", "tenants", "create", "refused-1")
    assert missing.code == 64 + 16  # UNAUTHENTICATED
    assert missing.error()["reason"] == "CREDENTIALS_MISSING"
    chat = run_ctl(*target, "--token", CHAT_TOKEN, "--json", "tenants", "create", "refused-1")
    assert chat.code == 64 + 7  # PERMISSION_DENIED
    assert chat.error()["reason"] == "CALLER_NOT_PERMITTED"
    created = run_ctl(*target, "--token", OPERATOR_TOKEN, "tenants", "get", "refused-1")
    assert created.code == 69


# Mutual TLS


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    directory = tmp_path_factory.mktemp("tls")
    authority = CertificateAuthority()
    certificate, key = authority.server().write(directory, "server")
    authority.client("ops-alice").write(directory, "operator")
    authority.client("someone-else").write(directory, "stranger")
    (directory / "ca.crt").write_bytes(authority.certificate_pem)
    settings = server_settings(
        directory,
        BILLING_TLS_CERT_FILE=str(certificate),
        BILLING_TLS_KEY_FILE=str(key),
        BILLING_TLS_CLIENT_CA_FILE=str(directory / "ca.crt"),
        BILLING_TLS_CLIENT_ROLES="operator=ops-alice",
    )
    with ServerProcess(settings) as process:
        yield process, directory


def test_mutual_tls_with_the_operator_certificate(
    tls_server: tuple[ServerProcess, Path],
) -> None:
    server, files = tls_server
    tenant_id = f"t-{uuid.uuid4().hex[:12]}"
    target = f"localhost:{server.port}"
    created = run_ctl(
        "--target", target, "--ca-file", str(files / "ca.crt"),
        "--cert-file", str(files / "operator.crt"), "--key-file", str(files / "operator.key"),
        "tenants", "create", tenant_id,
    )  # fmt: skip
    assert created.code == 0, created.stderr
    env = {
        "BILLING_TARGET": target,
        "BILLING_CA_FILE": str(files / "ca.crt"),
        "BILLING_CERT_FILE": str(files / "operator.crt"),
        "BILLING_KEY_FILE": str(files / "operator.key"),
    }
    assert run_ctl("tenants", "get", tenant_id, env=env).code == 0


def test_mutual_tls_refusals(tls_server: tuple[ServerProcess, Path]) -> None:
    server, files = tls_server
    target = ("--target", f"localhost:{server.port}", "--ca-file", str(files / "ca.crt"))
    stranger = run_ctl(
        *target, "--cert-file", str(files / "stranger.crt"),
        "--key-file", str(files / "stranger.key"), "--json", "tenants", "get", "x",
    )  # fmt: skip
    assert stranger.code == 64 + 16
    assert stranger.error()["reason"] == "CLIENT_CERTIFICATE_UNKNOWN"
    # No client certificate: the handshake fails.
    assert run_ctl(*target, "tenants", "get", "x").code == 78
    # Plaintext to a TLS port.
    assert run_ctl("--target", f"localhost:{server.port}", "tenants", "get", "x").code == 78


def test_an_unreadable_certificate_file_is_a_usage_error(tmp_path: Path) -> None:
    result = run_ctl("--ca-file", str(tmp_path / "missing.crt"), "tenants", "get", "x")
    assert result.code == 2
    assert "cannot read a TLS file" in result.stderr
