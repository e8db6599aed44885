"""The Stripe webhook endpoint: verifies, parses and applies events exactly once per event id.

POST /stripe/webhook on its own port. A request is applied only if its `Stripe-Signature`
verifies against the endpoint secret within the tolerance window (checked by the SDK on the
raw body); anything else is answered 400 and changes nothing. A verified event of a handled
type becomes facts (`payments/events.py`) for the `StripeEventSink`; other types are
acknowledged and ignored.

Exactly once per event id: an event is recorded as processed only after the sink applied it,
and an event already recorded is acknowledged without reaching the sink again. A crash between
the two makes Stripe redeliver, and the sink's own idempotency makes that harmless. When the
sink fails, the answer is 5xx so that Stripe redelivers. Deliveries out of order are the
sink's to reconcile (see events.py).

Neither the secret nor a payload is ever logged: only event ids, types and reasons.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import stripe
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_service.config import ConfigError, Settings
from billing_service.core import Clock, utc_now
from billing_service.domain.errors import Unavailable
from billing_service.metrics import Metrics
from billing_service.payments.events import PaymentIntentFacts, StripeEventSink
from billing_service.storage.stripe_event_store import StripeEventStore

_log = logging.getLogger(__name__)

WEBHOOK_PATH = "/stripe/webhook"
# Stripe's events are far smaller; anything larger is not one of them.
_MAX_BODY_BYTES = 1024 * 1024


class ProcessedEvents(Protocol):
    async def is_processed(self, event_id: str) -> bool: ...

    async def record_processed(
        self,
        *,
        event_id: str,
        event_type: str,
        created: datetime,
        received_at: datetime,
        processed_at: datetime,
    ) -> None: ...


class MalformedEvent(ValueError):
    """A verified body that is not a Stripe event we can read; the message names what is wrong
    and never quotes the payload."""


# Parsing


@dataclass(frozen=True, slots=True)
class StripeEvent:
    event_id: str
    type: str
    created: datetime
    object: Mapping[str, Any]
    # The fields the change overwrote (e.g. the customer of a detached payment method).
    previous_attributes: Mapping[str, Any]


def parse_event(payload: bytes) -> StripeEvent:
    try:
        event = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MalformedEvent("the body is not JSON") from None
    if not isinstance(event, dict) or event.get("object") != "event":
        raise MalformedEvent("the body is not a Stripe event")
    data = _mapping(event, "data")
    previous = data.get("previous_attributes")
    return StripeEvent(
        event_id=_text(event, "id"),
        type=_text(event, "type"),
        created=_timestamp(event, "created"),
        object=_mapping(data, "object"),
        previous_attributes=previous if isinstance(previous, dict) else {},
    )


def _mapping(source: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = source.get(key)
    if not isinstance(value, dict):
        raise MalformedEvent(f"{key} is not an object")
    return value


def _text(source: Mapping[str, Any], key: str) -> str:
    value = source.get(key)
    if not isinstance(value, str) or not value:
        raise MalformedEvent(f"{key} is not a non-empty string")
    return value


def _cents(source: Mapping[str, Any], key: str) -> int:
    value = source.get(key)
    # bool is an int in Python; an amount never is one.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MalformedEvent(f"{key} is not an amount in cents")
    return value


def _timestamp(source: Mapping[str, Any], key: str) -> datetime:
    value = source.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedEvent(f"{key} is not a unix timestamp")
    return datetime.fromtimestamp(value, UTC)


def _optional_id(source: Mapping[str, Any], key: str) -> str | None:
    """An id field, whether Stripe sent the id or the expanded object."""
    value = source.get(key)
    if isinstance(value, dict):
        value = value.get("id")
    if value is None or (isinstance(value, str) and value):
        return value
    raise MalformedEvent(f"{key} is not an id")


def payment_intent_facts(event: StripeEvent) -> PaymentIntentFacts:
    intent = event.object
    metadata = intent.get("metadata")
    charge_id = metadata.get("charge_id") if isinstance(metadata, dict) else None
    error = intent.get("last_payment_error")
    message = error.get("message") if isinstance(error, dict) else None
    return PaymentIntentFacts(
        payment_intent_id=_text(intent, "id"),
        customer_id=_optional_id(intent, "customer"),
        amount_cents=_cents(intent, "amount"),
        charge_id=charge_id if isinstance(charge_id, str) and charge_id else None,
        failure_message=message if isinstance(message, str) and message else None,
        occurred_at=event.created,
    )


# Dispatch: one function per handled type, from the event to the sink's method.

Handler = Callable[[StripeEventSink, StripeEvent], Awaitable[None]]


async def _payment_intent_succeeded(sink: StripeEventSink, event: StripeEvent) -> None:
    await sink.payment_intent_succeeded(payment_intent_facts(event))


async def _payment_intent_failed(sink: StripeEventSink, event: StripeEvent) -> None:
    await sink.payment_intent_failed(payment_intent_facts(event))


async def _payment_intent_requires_action(sink: StripeEventSink, event: StripeEvent) -> None:
    await sink.payment_intent_requires_action(payment_intent_facts(event))


async def _payment_method_detached(sink: StripeEventSink, event: StripeEvent) -> None:
    # Detaching clears the payment method's customer; the event keeps it among the
    # previous attributes.
    customer_id = _optional_id(event.previous_attributes, "customer") or _optional_id(
        event.object, "customer"
    )
    await sink.payment_method_detached(
        payment_method_id=_text(event.object, "id"),
        customer_id=customer_id,
        occurred_at=event.created,
    )


async def _setup_intent_succeeded(sink: StripeEventSink, event: StripeEvent) -> None:
    await sink.setup_intent_succeeded(
        setup_intent_id=_text(event.object, "id"),
        customer_id=_optional_id(event.object, "customer"),
        payment_method_id=_optional_id(event.object, "payment_method"),
        occurred_at=event.created,
    )


async def _charge_refunded(sink: StripeEventSink, event: StripeEvent) -> None:
    payment_intent_id = _optional_id(event.object, "payment_intent")
    if payment_intent_id is None:
        # A charge made without a PaymentIntent is not one of ours: we only create intents.
        _log.info("stripe event %s: a charge without a PaymentIntent, ignored", event.event_id)
        return
    await sink.charge_refunded(
        payment_intent_id=payment_intent_id,
        amount_refunded_cents=_cents(event.object, "amount_refunded"),
        occurred_at=event.created,
    )


async def _dispute_created(sink: StripeEventSink, event: StripeEvent) -> None:
    # A Dispute names its charge and PaymentIntent, not the customer; the sink finds the
    # tenant from the PaymentIntent.
    await sink.dispute_created(
        payment_intent_id=_optional_id(event.object, "payment_intent"),
        customer_id=_optional_id(event.object, "customer"),
        occurred_at=event.created,
    )


HANDLERS: Mapping[str, Handler] = {
    "payment_intent.succeeded": _payment_intent_succeeded,
    "payment_intent.payment_failed": _payment_intent_failed,
    "payment_intent.requires_action": _payment_intent_requires_action,
    "payment_method.detached": _payment_method_detached,
    "setup_intent.succeeded": _setup_intent_succeeded,
    "charge.refunded": _charge_refunded,
    "charge.dispute.created": _dispute_created,
}


# The endpoint


@dataclass
class _EventLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class StripeWebhookEndpoint:
    """Handles one delivery: verify, parse, apply once, answer."""

    def __init__(
        self,
        *,
        secret: str,
        sink: StripeEventSink,
        processed: ProcessedEvents,
        tolerance_s: int = stripe.Webhook.DEFAULT_TOLERANCE,
        timeout_s: float = 10.0,
        clock: Clock = utc_now,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics
        self._secret = secret
        self._sink = sink
        self._processed = processed
        self._tolerance_s = tolerance_s
        self._timeout_s = timeout_s
        self._clock = clock
        # Concurrent deliveries of one event (Stripe retries while the first is still being
        # applied) are applied one after the other here, so the second one sees the first.
        self._locks: dict[str, _EventLock] = {}

    async def handle(self, request: web.Request) -> web.Response:
        response = await self._handle(request)
        if self._metrics is not None:
            self._metrics.webhook_events.labels(_COUNTED_AS[response[_OUTCOME]]).inc()
        return response

    async def _handle(self, request: web.Request) -> web.Response:
        received_at = self._clock()
        payload = await request.read()
        try:
            stripe.WebhookSignature.verify_header(
                payload, request.headers.get("Stripe-Signature"), self._secret, self._tolerance_s
            )
            event = parse_event(payload)
        except stripe.SignatureVerificationError as error:
            # The SDK's message names what failed (missing, unparsable, no match, too old);
            # the header and payload it also carries are not logged.
            _log.warning("stripe webhook rejected: %s", error.user_message)
            return _answer(400, "signature verification failed")
        except (MalformedEvent, UnicodeDecodeError) as error:
            _log.warning("stripe webhook rejected: %s", error)
            return _answer(400, "not a Stripe event")
        handler = HANDLERS.get(event.type)
        if handler is None:
            return _answer(200, "ignored")
        return await self._apply_once(handler, event, received_at)

    async def _apply_once(
        self, handler: Handler, event: StripeEvent, received_at: datetime
    ) -> web.Response:
        entry = self._locks.setdefault(event.event_id, _EventLock())
        entry.users += 1
        try:
            async with entry.lock:
                return await self._apply(handler, event, received_at)
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[event.event_id]

    async def _apply(
        self, handler: Handler, event: StripeEvent, received_at: datetime
    ) -> web.Response:
        where = f"stripe event {event.event_id} ({event.type})"
        try:
            if await self._processed.is_processed(event.event_id):
                _log.info("%s: already processed", where)
                return _answer(200, "duplicate")
            async with asyncio.timeout(self._timeout_s):
                await handler(self._sink, event)
            await self._processed.record_processed(
                event_id=event.event_id,
                event_type=event.type,
                created=event.created,
                received_at=received_at,
                processed_at=self._clock(),
            )
        except MalformedEvent as error:
            _log.warning("%s rejected: %s", where, error)
            return _answer(400, "not a Stripe event")
        except (Unavailable, TimeoutError) as error:
            _log.warning("%s not processed, Stripe will redeliver: %s", where, type(error).__name__)
            return _answer(503, "try again")
        except Exception:
            _log.exception("%s failed, Stripe will redeliver", where)
            return _answer(500, "failed")
        _log.info("%s processed", where)
        return _answer(200, "processed")


_OUTCOME = web.ResponseKey("outcome", str)
# The answer's outcome -> billing_webhook_events_total's outcome label.
_COUNTED_AS = {
    "processed": "applied",
    "duplicate": "duplicate",
    "ignored": "ignored",
    "signature verification failed": "rejected",
    "not a Stripe event": "rejected",
    "try again": "failed",
    "failed": "failed",
}


def _answer(status: int, outcome: str) -> web.Response:
    response = web.json_response({"outcome": outcome}, status=status)
    response[_OUTCOME] = outcome
    return response


# The server


class WebhookServer:
    """The endpoint served on its own HTTP port; `stop()` lets in-flight deliveries finish."""

    def __init__(self, runner: web.AppRunner, port: int) -> None:
        self._runner = runner
        self.port = port

    @classmethod
    async def start(
        cls, endpoint: StripeWebhookEndpoint, host: str, port: int, shutdown_grace_s: float
    ) -> WebhookServer:
        app = web.Application(client_max_size=_MAX_BODY_BYTES)
        app.router.add_post(WEBHOOK_PATH, endpoint.handle)
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_grace_s
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as error:
            await runner.cleanup()
            where = f"BILLING_WEBHOOK_PORT: cannot listen on {host}:{port}"
            raise ConfigError(f"{where}: {error.strerror}") from None
        return cls(runner, port)

    async def stop(self) -> None:
        _log.info("closing the Stripe webhook endpoint; deliveries in flight may finish")
        await self._runner.cleanup()


def load_webhook_secret(settings: Settings) -> str:
    """The endpoint secret, from the environment or the mounted file; ConfigError if unusable."""
    if settings.stripe_webhook_secret is not None:
        secret = settings.stripe_webhook_secret.get_secret_value()
        where = "BILLING_STRIPE_WEBHOOK_SECRET"
    elif settings.stripe_webhook_secret_file is not None:
        where = f"BILLING_STRIPE_WEBHOOK_SECRET_FILE {settings.stripe_webhook_secret_file}"
        try:
            secret = settings.stripe_webhook_secret_file.read_text().strip()
        except OSError as error:
            raise ConfigError(f"{where}: cannot read it: {error.strerror}") from None
    else:
        raise ConfigError("the webhook endpoint needs BILLING_STRIPE_WEBHOOK_SECRET(_FILE)")
    if not secret.strip():
        raise ConfigError(f"{where}: the secret is empty")
    return secret.strip()


async def start_webhook_server(
    settings: Settings,
    sink: StripeEventSink | None,
    engine: AsyncEngine,
    clock: Clock = utc_now,
    metrics: Metrics | None = None,
) -> WebhookServer | None:
    """Serves the endpoint when BILLING_WEBHOOK_PORT is set; None when it is off."""
    if not settings.webhook_port:
        return None
    secret = load_webhook_secret(settings)
    if sink is None:
        raise ConfigError(
            "BILLING_WEBHOOK_PORT is set, but payments are not configured to receive the events"
        )
    endpoint = StripeWebhookEndpoint(
        secret=secret,
        sink=sink,
        processed=StripeEventStore(engine),
        tolerance_s=settings.stripe_webhook_tolerance_s,
        timeout_s=settings.stripe_webhook_timeout_s,
        clock=clock,
        metrics=metrics,
    )
    server = await WebhookServer.start(
        endpoint, settings.webhook_host, settings.webhook_port, settings.shutdown_grace_s
    )
    _log.info(
        "serving Stripe webhooks on http://%s:%d%s",
        settings.webhook_host,
        server.port,
        WEBHOOK_PATH,
    )
    return server
