"""Who may call what: bearer tokens and client certificates, each mapped to a role.

A caller is authenticated by a bearer token (`authorization: Bearer <token>` metadata) and/or by
the certificate it presented over mutual TLS (its CN or any SAN); the roles of both add up. Each
role may call some services:

    chat-service     billing.v1.BillingService
    operator         every service
    product-backend  the tenant-facing services (billing.v1.AccountService, billing.v1.UsageService,
                     billing.v1.BudgetService)

Health and reflection are open to everyone, so probes and debugging tools need no credentials.
With no token and no client CA configured, authentication is off (local development, sidecars
on 127.0.0.1).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import grpc

from billing_service.config import ConfigError, Settings
from billing_service.domain.errors import ErrorReason

__all__ = [
    "OPEN_SERVICES",
    "AuthFailure",
    "Authenticator",
    "Caller",
    "Role",
    "load_authenticator",
    "role_may_call",
    "server_credentials",
]


class Role(StrEnum):
    CHAT_SERVICE = "chat-service"
    OPERATOR = "operator"
    PRODUCT_BACKEND = "product-backend"


BILLING_SERVICE = "billing.v1.BillingService"

# The tenant-facing services (usage dashboard, payment methods).
TENANT_FACING_SERVICES: frozenset[str] = frozenset(
    {"billing.v1.AccountService", "billing.v1.UsageService", "billing.v1.BudgetService"}
)

OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)


def role_may_call(role: Role, service: str) -> bool:
    if role is Role.OPERATOR:
        return True
    if role is Role.CHAT_SERVICE:
        return service == BILLING_SERVICE
    return service in TENANT_FACING_SERVICES


@dataclass(frozen=True, slots=True)
class Caller:
    roles: frozenset[Role]
    # For logs: which credential, never the secret itself.
    label: str


class AuthFailure(Exception):
    def __init__(self, code: grpc.StatusCode, reason: ErrorReason, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


_TOKEN = re.compile(r"(?:(?![#,])[!-~]){16,512}")
_BEARER = re.compile(r"bearer\s+(\S+)\s*", re.IGNORECASE)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Authenticator:
    """Maps the credentials of a call to its caller, and refuses calls it may not make.

    Tokens are kept only as SHA-256 digests and looked up by digest, so neither the lookup's
    timing nor a memory dump gives a token away.
    """

    def __init__(self, tokens: Mapping[bytes, Role], certificate_roles: Mapping[str, Role]) -> None:
        self._tokens = dict(tokens)
        self._certificate_roles = dict(certificate_roles)

    @property
    def enabled(self) -> bool:
        return bool(self._tokens or self._certificate_roles)

    def authenticate(
        self,
        metadata: Iterable[tuple[str, str | bytes]],
        auth_context: Mapping[str, Iterable[bytes]],
    ) -> Caller:
        roles: set[Role] = set()
        labels: list[str] = []
        headers = [value for key, value in metadata if key == "authorization"]
        if len(headers) > 1:
            raise AuthFailure(
                grpc.StatusCode.UNAUTHENTICATED,
                ErrorReason.TOKEN_INVALID,
                "send one authorization header",
            )
        if headers:
            match = _BEARER.fullmatch(headers[0]) if isinstance(headers[0], str) else None
            digest = _digest(match.group(1)) if match else b""
            role = self._tokens.get(digest)
            if role is None:
                raise AuthFailure(
                    grpc.StatusCode.UNAUTHENTICATED,
                    ErrorReason.TOKEN_INVALID,
                    "the bearer token is not valid",
                )
            roles.add(role)
            labels.append(f"{role} token {digest.hex()[:8]}")
        identities = [
            name.decode(errors="replace")
            for key in ("x509_common_name", "x509_subject_alternative_name")
            for name in auth_context.get(key, ())
        ]
        for identity in identities:
            if (role := self._certificate_roles.get(identity)) is not None:
                roles.add(role)
                labels.append(f"{role} certificate {identity}")
        if not roles:
            if identities:
                raise AuthFailure(
                    grpc.StatusCode.UNAUTHENTICATED,
                    ErrorReason.CLIENT_CERTIFICATE_UNKNOWN,
                    "the client certificate names no known caller",
                )
            raise AuthFailure(
                grpc.StatusCode.UNAUTHENTICATED,
                ErrorReason.CREDENTIALS_MISSING,
                "send a bearer token (authorization: Bearer <token>) or a client certificate",
            )
        return Caller(frozenset(roles), ", ".join(labels))

    def authorize(self, caller: Caller, service: str) -> None:
        if not any(role_may_call(role, service) for role in caller.roles):
            roles = ", ".join(sorted(caller.roles))
            raise AuthFailure(
                grpc.StatusCode.PERMISSION_DENIED,
                ErrorReason.CALLER_NOT_PERMITTED,
                f"{roles} may not call {service}",
            )


def load_authenticator(settings: Settings) -> Authenticator:
    """Reads the tokens and certificate roles the settings name; ConfigError when unusable."""
    tokens: dict[bytes, Role] = {}
    sources: list[tuple[str, str]] = []
    if settings.auth_tokens is not None:
        sources.append(("BILLING_AUTH_TOKENS", settings.auth_tokens.get_secret_value()))
    if settings.auth_tokens_file is not None:
        text = _read_text(settings.auth_tokens_file, "BILLING_AUTH_TOKENS_FILE")
        sources.append((f"BILLING_AUTH_TOKENS_FILE {settings.auth_tokens_file}", text))
    for where, text in sources:
        for number, (role, token) in enumerate(_role_entries(text, where), start=1):
            if not _TOKEN.fullmatch(token):
                raise ConfigError(
                    f"{where}: entry {number}: a token is 16 to 512 printable ASCII characters "
                    "without spaces, commas or #"
                )
            if tokens.setdefault(_digest(token), role) is not role:
                raise ConfigError(f"{where}: entry {number}: the token is given to two roles")
    certificate_roles: dict[str, Role] = {}
    for role, identity in _role_entries(settings.tls_client_roles, "BILLING_TLS_CLIENT_ROLES"):
        if certificate_roles.setdefault(identity, role) is not role:
            raise ConfigError(f"BILLING_TLS_CLIENT_ROLES: {identity} is given to two roles")
    if settings.tls_client_ca_file is not None and not (tokens or certificate_roles):
        raise ConfigError(
            "BILLING_TLS_CLIENT_CA_FILE is set but no caller has a role: "
            "set BILLING_TLS_CLIENT_ROLES (or tokens)"
        )
    return Authenticator(tokens, certificate_roles)


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials of the gRPC port, or None for plaintext."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    chain = _read_pem(settings.tls_cert_file, "BILLING_TLS_CERT_FILE", "CERTIFICATE")
    key = _read_pem(settings.tls_key_file, "BILLING_TLS_KEY_FILE", "PRIVATE KEY")
    client_ca = None
    if settings.tls_client_ca_file is not None:
        client_ca = _read_pem(
            settings.tls_client_ca_file, "BILLING_TLS_CLIENT_CA_FILE", "CERTIFICATE"
        )
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _role_entries(text: str, where: str) -> list[tuple[Role, str]]:
    """Parses `role=value` entries separated by commas, spaces or lines; `#` starts a comment.

    Errors name the entry by its number, never by its text: it may be a token.
    """
    entries: list[tuple[Role, str]] = []
    for line in text.splitlines():
        for entry in re.split(r"[\s,]+", line.split("#", 1)[0]):
            if not entry:
                continue
            number = len(entries) + 1
            role_name, equals, value = entry.partition("=")
            if not equals or not value:
                raise ConfigError(f"{where}: entry {number} is not role=value")
            try:
                role = Role(role_name)
            except ValueError:
                known = ", ".join(role.value for role in Role)
                raise ConfigError(
                    f"{where}: entry {number} has an unknown role (use {known})"
                ) from None
            entries.append((role, value))
    return entries


def _read_text(path: Path, variable: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read {variable} {path}: {_why(error)}") from None


def _read_pem(path: Path, variable: str, kind: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read {variable} {path}: {_why(error)}") from None
    if b"-----BEGIN " not in data or kind.encode() not in data:
        raise ConfigError(f"{variable} {path} is not a PEM file with a {kind}")
    return data


def _why(error: Exception) -> str:
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)
