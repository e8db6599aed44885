"""Channels to the billing service: keepalive, TLS or mutual TLS, and a bearer token."""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Sequence
from typing import Any

import grpc
import grpc.aio

__all__ = ["CHANNEL_OPTIONS", "connect_aio_channel", "connect_channel"]

# grpc core channel arguments (grpc/impl/channel_arg_names.h). The server admits pings every
# 10 s, so 30 s keeps idle sidecar connections checked without being told off (too_many_pings).
# Reconnect backoff is capped low: a restarted billing server should be found again within
# seconds, since every chat request waits on it.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


def _with_token(metadata: Iterable[Any] | None, token: str) -> tuple[tuple[str, str | bytes], ...]:
    return (*(metadata or ()), ("authorization", f"Bearer {token}"))


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, token: str) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = _with_token(details.metadata, token)
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds `authorization: Bearer <token>` to every call, as the server expects.

    An interceptor rather than call credentials: gRPC sends call credentials only over TLS, and a
    token over plain TCP to a sidecar on 127.0.0.1 is a supported setup of the server.
    """

    def __init__(self, token: str) -> None:
        self._token = token

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(_ClientCallDetails(details, self._token), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(_ClientCallDetails(details, self._token), request)

    def intercept_stream_unary(
        self,
        continuation: Callable[..., Any],
        details: grpc.ClientCallDetails,
        request_iterator: Iterator[Any],
    ) -> Any:
        return continuation(_ClientCallDetails(details, self._token), request_iterator)

    def intercept_stream_stream(
        self,
        continuation: Callable[..., Any],
        details: grpc.ClientCallDetails,
        request_iterator: Iterator[Any],
    ) -> Any:
        return continuation(_ClientCallDetails(details, self._token), request_iterator)


def _aio_details(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(
        method=details.method,
        timeout=details.timeout,
        metadata=grpc.aio.Metadata(*_with_token(details.metadata, token)),
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


class _AioUnaryUnaryToken(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_aio_details(details, self._token), request)


class _AioUnaryStreamToken(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_aio_details(details, self._token), request)


class _AioStreamUnaryToken(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_stream_unary(
        self,
        continuation: Callable[..., Any],
        details: grpc.aio.ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Iterable[Any],
    ) -> Any:
        return await continuation(_aio_details(details, self._token), request_iterator)


class _AioStreamStreamToken(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_stream_stream(
        self,
        continuation: Callable[..., Any],
        details: grpc.aio.ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Iterable[Any],
    ) -> Any:
        return await continuation(_aio_details(details, self._token), request_iterator)


def _credentials(
    root_certificates: bytes | None,
    certificate_chain: bytes | None,
    private_key: bytes | None,
    tls: bool | None,
) -> grpc.ChannelCredentials | None:
    """TLS when asked (`tls=True`) or when any certificate is given; None means plain TCP."""
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("certificate_chain and private_key go together (mutual TLS)")
    wants_tls = any(v is not None for v in (root_certificates, certificate_chain))
    if tls is None:
        tls = wants_tls
    if not tls:
        if wants_tls:
            raise ValueError("certificates were given but tls=False")
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=root_certificates,
        private_key=private_key,
        certificate_chain=certificate_chain,
    )


def _options(extra: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    overridden = {name for name, _ in extra}
    return [o for o in CHANNEL_OPTIONS if o[0] not in overridden] + list(extra)


def connect_channel(
    target: str,
    *,
    token: str | None = None,
    root_certificates: bytes | None = None,
    certificate_chain: bytes | None = None,
    private_key: bytes | None = None,
    tls: bool | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A channel to the billing service at `target` ("host:port").

    Plain TCP unless `tls=True` or certificates are given: `root_certificates` (PEM) to trust
    (None: the system roots), `certificate_chain` + `private_key` (PEM) for mutual TLS. `token`
    is sent as `authorization: Bearer <token>` on every call. `options` add to or override
    `CHANNEL_OPTIONS`.
    """
    credentials = _credentials(root_certificates, certificate_chain, private_key, tls)
    channel_options = _options(options)
    if credentials is None:
        channel = grpc.insecure_channel(target, options=channel_options)
    else:
        channel = grpc.secure_channel(target, credentials, options=channel_options)
    if token is not None:
        channel = grpc.intercept_channel(channel, _BearerToken(token))
    return channel


def connect_aio_channel(
    target: str,
    *,
    token: str | None = None,
    root_certificates: bytes | None = None,
    certificate_chain: bytes | None = None,
    private_key: bytes | None = None,
    tls: bool | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """The asyncio twin of `connect_channel`, with the same arguments."""
    credentials = _credentials(root_certificates, certificate_chain, private_key, tls)
    # grpc-stubs types this parameter as a placeholder that no class satisfies.
    interceptors: list[Any] = []
    if token is not None:
        interceptors = [
            _AioUnaryUnaryToken(token),
            _AioUnaryStreamToken(token),
            _AioStreamUnaryToken(token),
            _AioStreamStreamToken(token),
        ]
    channel_options = _options(options)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=channel_options, interceptors=interceptors)
    return grpc.aio.secure_channel(
        target, credentials, options=channel_options, interceptors=interceptors
    )
