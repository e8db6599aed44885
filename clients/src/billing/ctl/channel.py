"""The gRPC channel to the billing service: plaintext, TLS or mutual TLS, as the server is set up
(see the service's BILLING_TLS_* settings), and the bearer token sent with each call."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

# Keep an idle operator connection alive through proxies; as the service's own clients do.
_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


@dataclass(frozen=True)
class TlsFiles:
    """TLS to the server: `ca_file` verifies it (None: the system's roots); `cert_file` and
    `key_file` are this client's certificate for mutual TLS (both or neither)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None


def connect_channel(target: str, tls: TlsFiles | None = None) -> grpc.Channel:
    """A channel to `target` (host:port); plaintext when `tls` is None. Raises OSError when a
    certificate file cannot be read."""
    if tls is None:
        return grpc.insecure_channel(target, options=_OPTIONS)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file),
        private_key=_read(tls.key_file),
        certificate_chain=_read(tls.cert_file),
    )
    options = list(_OPTIONS)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(target, credentials, options=options)


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The `authorization` header the server's token authentication reads; none without a token."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def _read(path: Path | None) -> bytes | None:
    return None if path is None else path.read_bytes()
