"""The gRPC listener: channel options (limits, keepalive) and the port, plaintext or TLS."""

from __future__ import annotations

import ipaddress
import socket

import grpc

from billing_service.config import ConfigError, Settings

__all__ = ["exposure_warning", "listen", "server_options"]


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments of the server (grpc core names, see grpc/impl/channel_arg_names.h)."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Dead peers (a node gone, a NAT that dropped the flow) are found by pinging idle
        # connections; sidecar connections live for days.
        ("grpc.keepalive_time_ms", _ms(settings.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(settings.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Clients that ping more often than this get GOAWAY (too_many_pings).
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            _ms(settings.keepalive_min_client_interval_s),
        ),
        ("grpc.http2.max_ping_strikes", 2),
        # grpcio sets SO_REUSEPORT by default: a second server on the same port would then start
        # and silently take half the connections. Fail the bind instead.
        ("grpc.so_reuseport", 0),
    ]
    if settings.max_connection_age_s > 0:
        # Behind a Kubernetes Service a connection stays on one pod; closing old connections
        # lets clients spread over new replicas after a scale-up.
        options += [
            ("grpc.max_connection_age_ms", _ms(settings.max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", _ms(settings.shutdown_grace_s)),
        ]
    return options


def listen(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None
) -> int:
    """Binds `address`; returns the port (the chosen one for port 0)."""
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as error:
        raise ConfigError(f"cannot listen on {address}: {_bind_error(address) or error}") from None
    if port == 0:
        raise ConfigError(f"cannot listen on {address} (in use, or not an address of this host)")
    return port


def _bind_error(address: str) -> str:
    """Why `address` cannot be bound, as the system says it ("Address already in use"): grpc's
    own error only says that it failed. Empty when a plain socket can bind it."""
    host, _, port = address.rpartition(":")
    try:
        family, kind, proto, _, where = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(where)
    except (OSError, ValueError) as error:
        return getattr(error, "strerror", None) or str(error)
    return ""


def exposure_warning(address: str, authenticated: bool) -> str | None:
    """The warning for serving money-moving calls to the network without authentication."""
    if authenticated:
        return None
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return (
        f"SERVING WITHOUT AUTHENTICATION ON {address}: anyone who can reach this address can "
        "reserve, commit, refund and grant credit. Bind 127.0.0.1 (sidecar) or configure "
        "BILLING_AUTH_TOKENS(_FILE) or BILLING_TLS_CLIENT_CA_FILE."
    )


def _ms(seconds: float) -> int:
    return round(seconds * 1000)
