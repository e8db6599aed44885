"""Optional OpenTelemetry tracing of every call (BILLING_TRACING, off by default).

Spans come from the maintained gRPC instrumentation (opentelemetry-instrumentation-grpc), through
a tracer provider of our own rather than the global one, so several servers in one process (the
tests) do not share it. The exporter is configured by the standard OTEL_* variables
(OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, ...). The packages come with the `tracing`
extra: `pip install 'ai-billing[tracing]'` (the container image has them).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

import grpc

from billing_service.config import ConfigError

__all__ = ["Tracing", "start_tracing"]


@dataclass(frozen=True)
class Tracing:
    interceptor: grpc.aio.ServerInterceptor[Any, Any]
    # Flushes the spans still buffered and stops the exporter.
    shutdown: Callable[[], None]


def start_tracing(mode: Literal["off", "otlp", "console"]) -> Tracing | None:
    if mode == "off":
        return None
    try:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )
    except ImportError:
        raise ConfigError(
            f"BILLING_TRACING={mode} needs the tracing extra: pip install 'ai-billing[tracing]'"
        ) from None
    exporter: SpanExporter
    if mode == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    else:
        exporter = ConsoleSpanExporter()
    service_name = os.environ.get("OTEL_SERVICE_NAME") or "ai-billing"
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    # Probes call Health every few seconds: their spans would drown the billing calls.
    not_health = filters.negate(filters.service_name("grpc.health.v1.Health"))
    interceptor = cast(
        "grpc.aio.ServerInterceptor[Any, Any]",
        aio_server_interceptor(tracer_provider=provider, filter_=not_health),
    )
    return Tracing(interceptor, provider.shutdown)
