"""Prometheus metrics (prometheus-client), served on their own HTTP port.

Per process: RPC counts and latencies, decisions, money moved (read off the answers the process
gave), card charge outcomes recorded, database pool usage. Database-wide: open holds and card
charges without an outcome, read by the readiness check's periodic query, so every replica
reports the same value (aggregate them with max, not sum).

Money counters count answers: a retried call that replays its first answer is counted again.
They are for rates and dashboards; the ledger is the record of the money.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from google.protobuf.message import Message
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from billing.v1 import admin_pb2, billing_pb2, types_pb2
from billing_service.config import ConfigError
from billing_service.domain.payments import ChargeTrigger

__all__ = ["Metrics", "MetricsServer"]

# The outcome label of billing_charges_total.
CHARGE_OUTCOMES = ("succeeded", "failed", "action_required", "unknown")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # The process, platform and GC collectors read global state: register the same objects.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        registry = self.registry
        rpc_labels = ["grpc_service", "grpc_method", "grpc_code"]
        self.rpcs_handled = Counter(
            "grpc_server_handled",
            "RPCs completed, by method and status code.",
            rpc_labels,
            registry=registry,
        )
        self.rpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from receiving an RPC to answering it.",
            rpc_labels,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.rpcs_in_flight = Gauge(
            "billing_rpcs_in_flight", "RPCs being handled right now.", registry=registry
        )
        self.decisions = Counter(
            "billing_decisions",
            "CheckAccess, ReserveCredit and ExtendHold answers: ALLOWED or the denial reason.",
            ["rpc", "decision"],
            registry=registry,
        )
        self.reserved_micros = Counter(
            "billing_reserved_micros", "Micros held by granted reservations.", registry=registry
        )
        self.extended_micros = Counter(
            "billing_extended_micros",
            "Micros added to open holds by granted extensions (ExtendHold).",
            registry=registry,
        )
        self.committed_micros = Counter(
            "billing_committed_micros", "Micros charged by commits.", registry=registry
        )
        self.uncollected_micros = Counter(
            "billing_uncollected_micros",
            "Cost of commits above their hold that the credit limit did not allow charging.",
            registry=registry,
        )
        self.released_micros = Counter(
            "billing_released_micros",
            "Micros of holds given back by Release (or a Refund without an amount) before any "
            "charge.",
            registry=registry,
        )
        self.refunded_micros = Counter(
            "billing_refunded_micros", "Micros of committed charges refunded.", registry=registry
        )
        self.granted_micros = Counter(
            "billing_granted_micros", "Micros of credit granted by operators.", registry=registry
        )
        self.holds_expired = Counter(
            "billing_holds_expired",
            "Holds released by this process because they expired.",
            registry=registry,
        )
        self.holds_open = Gauge(
            "billing_holds_open",
            "Open holds in the database (all replicas), as of the last readiness check.",
            registry=registry,
        )
        self.holds_open_micros = Gauge(
            "billing_holds_open_micros",
            "Micros held by open holds in the database, as of the last readiness check.",
            registry=registry,
        )
        self.webhook_events = Counter(
            "billing_webhook_events",
            "Deliveries to the Stripe webhook endpoint, by what became of them: applied, "
            "duplicate (applied before), ignored (a type we do not handle), rejected (bad "
            "signature or not an event: 400), failed (not applied, Stripe redelivers: 5xx).",
            ["outcome"],
            registry=registry,
        )
        self.ready = Gauge(
            "billing_ready",
            "1 while the database is reachable, writable and migrated (readiness SERVING), else 0.",
            registry=registry,
        )
        self.charges = Counter(
            "billing_charges",
            "Card charge outcomes recorded by this process (its worker, webhooks, operators), "
            "by what started the charge; unknown: Stripe's answer could not be learned.",
            ["trigger", "outcome"],
            registry=registry,
        )
        for trigger in ChargeTrigger:
            for outcome in CHARGE_OUTCOMES:
                self.charges.labels(str(trigger), outcome)
        self.charges_pending = Gauge(
            "billing_charges_pending",
            "Card charges in the database without a final outcome (pending or unresolved), "
            "as of the last readiness check.",
            registry=registry,
        )
        self.charge_oldest_pending_seconds = Gauge(
            "billing_charge_oldest_pending_seconds",
            "Age of the oldest card charge without a final outcome, 0 when there is none, as "
            "of the last readiness check.",
            registry=registry,
        )
        self.charges_needing_operator = Gauge(
            "billing_charges_needing_operator",
            "Card charges whose outcome could not be learned from Stripe automatically "
            "(UNRESOLVED: AdminService.ResolveCharge), as of the last readiness check.",
            registry=registry,
        )

    def charge_recorded(self, trigger: ChargeTrigger, outcome: str) -> None:
        """A charge attempt's outcome was recorded (payments.outbox.ChargeOutcomes)."""
        self.charges.labels(str(trigger), outcome).inc()

    def watch_pool(self, engine: AsyncEngine) -> None:
        self.registry.register(_PoolCollector(engine))

    def observe_answer(self, method: str, request: Message, response: Message) -> None:
        """Counts the business outcome of a successful call from its request and answer."""
        if isinstance(response, billing_pb2.CheckAccessResponse):
            self.decisions.labels(method, _decision(response.decision)).inc()
        elif isinstance(response, billing_pb2.ReserveCreditResponse):
            self.decisions.labels(method, _decision(response.decision)).inc()
            if response.decision.allowed:
                self.reserved_micros.inc(response.reservation.amount_micros)
        elif isinstance(response, billing_pb2.ExtendHoldResponse):
            self.decisions.labels(method, _decision(response.decision)).inc()
            self.extended_micros.inc(response.extended_micros)
        elif isinstance(response, billing_pb2.CommitResponse):
            self.committed_micros.inc(response.usage_record.charged_micros)
            self.uncollected_micros.inc(response.usage_record.uncollected_micros)
        elif isinstance(response, billing_pb2.ReleaseResponse):
            self.released_micros.inc(response.released_micros)
        elif isinstance(response, billing_pb2.RefundResponse):
            if response.kind == billing_pb2.REFUND_KIND_REFUND:
                self.refunded_micros.inc(response.amount_micros)
            else:
                self.released_micros.inc(response.amount_micros)
        elif isinstance(request, admin_pb2.GrantCreditRequest):
            self.granted_micros.inc(request.amount_micros)

    def serve(self, host: str, port: int) -> MetricsServer:
        """Starts the /metrics HTTP endpoint in a background thread."""
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {error.strerror}") from None
        return MetricsServer(server, thread)


@dataclass
class MetricsServer:
    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def _decision(decision: types_pb2.Decision) -> str:
    if decision.allowed:
        return "ALLOWED"
    return types_pb2.DenialReason.Name(decision.reason).removeprefix("DENIAL_REASON_")


class _PoolCollector(Collector):
    """The connection pool's state, read at scrape time."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._pool = engine.sync_engine.pool

    def collect(self) -> Iterable[Metric]:
        if not isinstance(self._pool, QueuePool):
            return
        in_use = GaugeMetricFamily(
            "billing_db_pool_connections",
            "Database connections of this process, by state.",
            labels=["state"],
        )
        in_use.add_metric(["in_use"], self._pool.checkedout())
        in_use.add_metric(["idle"], self._pool.checkedin())
        yield in_use
        yield GaugeMetricFamily(
            "billing_db_pool_max_connections",
            "The most connections the pool opens (pool size plus overflow).",
            value=self._pool.size() + max(getattr(self._pool, "_max_overflow", 0), 0),
        )
