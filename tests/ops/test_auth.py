"""Who may call what, over a real port: bearer tokens and mutual TLS, every service and method.

Each refused call is checked for its code (UNAUTHENTICATED: no or unknown credentials;
PERMISSION_DENIED: a known caller whose role may not call the service), its AIP-193 ErrorInfo
reason, and for having changed nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import symbol_database
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sqlalchemy import func, select

from billing.v1 import admin_pb2, billing_pb2
from billing_service.app import Application
from billing_service.security import Role
from billing_service.storage.tables import admin_requests, holds, tenants
from tests.ops.conftest import RunningServer
from tests.support.certs import CertificateAuthority, Issued
from tests.support.grpc_errors import rich_error

TOKENS = {
    Role.CHAT_SERVICE: "chat-token-0123456789abcdef",
    Role.OPERATOR: "operator-token-0123456789abcdef",
    Role.PRODUCT_BACKEND: "backend-token-0123456789abcdef",
}

BILLING = billing_pb2.DESCRIPTOR.services_by_name["BillingService"]
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
SERVICES = [BILLING, ADMIN]

# Which roles each service admits; every other role is PERMISSION_DENIED.
ADMITTED = {
    BILLING.full_name: {Role.CHAT_SERVICE, Role.OPERATOR},
    ADMIN.full_name: {Role.OPERATOR},
}


def rid() -> str:
    return str(uuid.uuid4())


def representative_call(service: str, tenant_id: str) -> tuple[str, Message]:
    """A call of `service` that succeeds for an admitted caller (and writes to the ledger)."""
    if service == BILLING.full_name:
        request = billing_pb2.ReserveCreditRequest(
            request_id=rid(), tenant_id=tenant_id, user_id="u", model="unit-priced", amount_micros=1
        )
        return "ReserveCredit", request
    return "CreateTenant", admin_pb2.CreateTenantRequest(request_id=rid(), tenant_id=tenant_id)


async def call(
    channel: grpc.aio.Channel,
    service: str,
    method: str,
    request: Message,
    metadata: Sequence[tuple[str, str]] = (),
) -> Any:
    descriptor = symbol_database.Default().pool.FindServiceByName(service)
    output = symbol_database.Default().GetSymbol(
        descriptor.methods_by_name[method].output_type.full_name
    )
    stub = channel.unary_unary(
        f"/{service}/{method}",
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=output.FromString,
    )
    return await stub(request, metadata=tuple(metadata), timeout=10)


async def refused(
    channel: grpc.aio.Channel,
    service: str,
    method: str,
    request: Message,
    metadata: Sequence[tuple[str, str]] = (),
) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(channel, service, method, request, metadata)
    error = rich_error(raised.value)
    return error.code, error.reason, error.domain


async def ledger_rows(app: Application) -> int:
    async with app.engine.connect() as conn:
        total = 0
        for table in (tenants, holds, admin_requests):
            total += (await conn.execute(select(func.count()).select_from(table))).scalar_one()
        return total


def bearer(role: Role) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKENS[role]}")]


# Tokens


@pytest.fixture
async def token_server(running_server: RunningServer, tmp_path: Path) -> AsyncIterator[Application]:
    # Two roles from the environment variable, one from the file: both sources count.
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"# product backend\nproduct-backend={TOKENS[Role.PRODUCT_BACKEND]}\n")
    async with running_server(
        auth_tokens=f"chat-service={TOKENS[Role.CHAT_SERVICE]}, operator={TOKENS[Role.OPERATOR]}",
        auth_tokens_file=tokens_file,
    ) as app:
        yield app


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("service", [s.full_name for s in SERVICES])
async def test_each_role_may_call_exactly_its_services(
    token_server: Application, role: Role, service: str
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{token_server.port}") as channel:
        method, request = representative_call(service, f"tenant-{role}")
        if role in ADMITTED[service]:
            await call(channel, service, method, request, bearer(role))
            assert await ledger_rows(token_server) > 0
        else:
            code, reason, domain = await refused(channel, service, method, request, bearer(role))
            assert (code, reason, domain) == (
                grpc.StatusCode.PERMISSION_DENIED,
                "CALLER_NOT_PERMITTED",
                "ai-billing",
            )
            assert await ledger_rows(token_server) == 0


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ([], "CREDENTIALS_MISSING"),
        ([("authorization", "Bearer not-a-known-token-at-all")], "TOKEN_INVALID"),
        ([("authorization", TOKENS[Role.OPERATOR])], "TOKEN_INVALID"),  # no "Bearer "
        ([("authorization", f"Basic {TOKENS[Role.OPERATOR]}")], "TOKEN_INVALID"),
        (bearer(Role.OPERATOR) + bearer(Role.CHAT_SERVICE), "TOKEN_INVALID"),
    ],
    ids=["none", "unknown", "no-scheme", "basic", "two-headers"],
)
async def test_every_method_refuses_a_caller_without_a_valid_token(
    token_server: Application, metadata: list[tuple[str, str]], reason: str
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{token_server.port}") as channel:
        for service in SERVICES:
            for method in service.methods:
                request = symbol_database.Default().GetSymbol(method.input_type.full_name)()
                code, got_reason, domain = await refused(
                    channel, service.full_name, method.name, request, metadata
                )
                assert (code, got_reason, domain) == (
                    grpc.StatusCode.UNAUTHENTICATED,
                    reason,
                    "ai-billing",
                ), f"{service.name}/{method.name}"
    assert await ledger_rows(token_server) == 0


async def test_every_admin_method_refuses_a_chat_service(token_server: Application) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{token_server.port}") as channel:
        for method in ADMIN.methods:
            request = symbol_database.Default().GetSymbol(method.input_type.full_name)()
            code, reason, _ = await refused(
                channel, ADMIN.full_name, method.name, request, bearer(Role.CHAT_SERVICE)
            )
            assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_PERMITTED")


async def test_health_and_reflection_need_no_credentials(token_server: Application) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{token_server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=BILLING.full_name))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        async for response in reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        ):
            names = {service.name for service in response.list_services_response.service}
            assert {BILLING.full_name, ADMIN.full_name} <= names
            break


async def test_without_any_auth_configured_calls_are_open(
    running_server: RunningServer,
) -> None:
    async with (
        running_server() as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        method, request = representative_call(ADMIN.full_name, "open-tenant")
        await call(channel, ADMIN.full_name, method, request)


# Mutual TLS

# Client certificates and the role each one's identity maps to (None: not mapped).
CLIENTS: dict[str, tuple[dict[str, str], Role | None]] = {
    "chat": ({"common_name": "chat-7f9c", "dns": "chat.billing.test"}, Role.CHAT_SERVICE),
    "operator": ({"common_name": "ops-alice"}, Role.OPERATOR),
    "backend": (
        {"common_name": "backend-1", "uri": "spiffe://billing.test/ns/web/sa/backend"},
        Role.PRODUCT_BACKEND,
    ),
    "stranger": ({"common_name": "someone-else", "dns": "elsewhere.test"}, None),
}


class Mtls:
    def __init__(self, app: Application, authority: CertificateAuthority) -> None:
        self.app = app
        self.authority = authority
        self.issued = {name: authority.client(**fields) for name, (fields, _) in CLIENTS.items()}

    def channel(self, client: str | None) -> grpc.aio.Channel:
        """A channel presenting the named client certificate (None: no certificate)."""
        issued = None if client is None else self.issued[client]
        return self.channel_with(issued)

    def channel_with(self, issued: Issued | None) -> grpc.aio.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.authority.certificate_pem,
            private_key=None if issued is None else issued.key_pem,
            certificate_chain=None if issued is None else issued.certificate_pem,
        )
        return grpc.aio.secure_channel(f"localhost:{self.app.port}", credentials)


@pytest.fixture
async def mtls(running_server: RunningServer, tmp_path: Path) -> AsyncIterator[Mtls]:
    authority = CertificateAuthority()
    certificate, key = authority.server().write(tmp_path, "server")
    client_ca = tmp_path / "clients-ca.crt"
    client_ca.write_bytes(authority.certificate_pem)
    roles = "chat-service=chat.billing.test, operator=ops-alice, "
    roles += "product-backend=spiffe://billing.test/ns/web/sa/backend"
    async with running_server(
        tls_cert_file=certificate,
        tls_key_file=key,
        tls_client_ca_file=client_ca,
        tls_client_roles=roles,
        auth_tokens=f"operator={TOKENS[Role.OPERATOR]}",
    ) as app:
        yield Mtls(app, authority)


@pytest.mark.parametrize("client", ["chat", "operator", "backend"])
@pytest.mark.parametrize("service", [s.full_name for s in SERVICES])
async def test_each_client_certificate_may_call_exactly_its_roles_services(
    mtls: Mtls, client: str, service: str
) -> None:
    role = CLIENTS[client][1]
    assert role is not None
    async with mtls.channel(client) as channel:
        method, request = representative_call(service, f"tenant-{client}")
        if role in ADMITTED[service]:
            await call(channel, service, method, request)
            assert await ledger_rows(mtls.app) > 0
        else:
            code, reason, _ = await refused(channel, service, method, request)
            assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_PERMITTED")
            assert await ledger_rows(mtls.app) == 0


async def test_a_certificate_of_no_known_caller_is_unauthenticated_on_every_service(
    mtls: Mtls,
) -> None:
    async with mtls.channel("stranger") as channel:
        for service in SERVICES:
            method, request = representative_call(service.full_name, "t")
            code, reason, _ = await refused(channel, service.full_name, method, request)
            assert (code, reason) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "CLIENT_CERTIFICATE_UNKNOWN",
            )
        # Health stays open to any client the TLS layer admits.
        health = health_pb2_grpc.HealthStub(channel)
        await health.Check(health_pb2.HealthCheckRequest())
    assert await ledger_rows(mtls.app) == 0


async def test_a_token_adds_its_role_to_an_unknown_certificate(mtls: Mtls) -> None:
    async with mtls.channel("stranger") as channel:
        method, request = representative_call(ADMIN.full_name, "via-token")
        await call(channel, ADMIN.full_name, method, request, bearer(Role.OPERATOR))


@pytest.mark.parametrize("who", ["no-certificate", "another-ca"])
async def test_clients_without_a_certificate_of_the_ca_cannot_connect(mtls: Mtls, who: str) -> None:
    rogue = CertificateAuthority("another CA").client("ops-alice")  # a mapped name, wrong CA
    async with mtls.channel_with(None if who == "no-certificate" else rogue) as channel:
        for service in SERVICES:
            method, request = representative_call(service.full_name, "t")
            code, _, _ = await refused(channel, service.full_name, method, request)
            assert code == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails
    assert await ledger_rows(mtls.app) == 0
