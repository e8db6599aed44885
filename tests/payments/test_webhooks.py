"""The Stripe webhook endpoint of a real server on a real port, over SQLite and PostgreSQL.

Events are posted signed exactly the way Stripe signs them (`t=<unix>,v1=<hex HMAC-SHA256 of
"<t>.<body>">`, computed here independently of the SDK), and localstripe delivers one itself.
The sink is a recording fake of the payments core's port: what the endpoint hands it is what
is asserted.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from pydantic import ValidationError
from sqlalchemy import select

from billing_service.app import Application
from billing_service.config import ConfigError, Settings
from billing_service.domain.errors import ErrorReason, Unavailable
from billing_service.payments.events import PaymentIntentFacts
from billing_service.payments.webhooks import WEBHOOK_PATH, load_webhook_secret
from billing_service.storage.tables import stripe_events
from tests.support.cli import run_cli
from tests.support.localstripe import API_KEY, LocalStripe
from tests.support.ports import free_port
from tests.support.postgres import PostgresServer

SECRET = "whsec_test_" + "s3cr3t" * 6
CREATED = 1_764_000_000  # 2025-11-24T16:00:00Z
_WAIT_S = 10.0
_databases = itertools.count()


# The recording sink


@dataclass
class RecordingSink:
    """Records every fact; fails the next `failures` calls, as a payments core might."""

    calls: list[tuple[str, Any]] = field(default_factory=list)
    failures: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def _record(self, name: str, facts: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("the payments core failed")
        async with self.changed:
            self.calls.append((name, facts))
            self.changed.notify_all()

    async def wait_for(self, found: Callable[[tuple[str, Any]], bool]) -> tuple[str, Any]:
        async with asyncio.timeout(_WAIT_S), self.changed:
            await self.changed.wait_for(lambda: any(found(call) for call in self.calls))
        return next(call for call in self.calls if found(call))

    async def payment_intent_succeeded(self, facts: PaymentIntentFacts) -> None:
        await self._record("payment_intent_succeeded", facts)

    async def payment_intent_failed(self, facts: PaymentIntentFacts) -> None:
        await self._record("payment_intent_failed", facts)

    async def payment_intent_requires_action(self, facts: PaymentIntentFacts) -> None:
        await self._record("payment_intent_requires_action", facts)

    async def payment_method_detached(self, **facts: Any) -> None:
        await self._record("payment_method_detached", facts)

    async def setup_intent_succeeded(self, **facts: Any) -> None:
        await self._record("setup_intent_succeeded", facts)

    async def charge_refunded(self, **facts: Any) -> None:
        await self._record("charge_refunded", facts)

    async def dispute_created(self, **facts: Any) -> None:
        await self._record("dispute_created", facts)


# Events as Stripe sends them


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def event(
    type_: str, obj: dict[str, Any], previous: dict[str, Any] | None = None
) -> dict[str, Any]:
    data: dict[str, Any] = {"object": obj}
    if previous is not None:
        data["previous_attributes"] = previous
    return {
        "id": _id("evt"),
        "object": "event",
        "api_version": "2024-06-20",
        "created": CREATED,
        "data": data,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": _id("req"), "idempotency_key": str(uuid.uuid4())},
        "type": type_,
    }


def payment_intent(status: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": _id("pi"),
        "object": "payment_intent",
        "amount": 2000,
        "amount_received": 2000 if status == "succeeded" else 0,
        "currency": "usd",
        "customer": "cus_T1",
        "metadata": {"charge_id": "chg_1", "tenant_id": "t1"},
        "payment_method": "pm_T1",
        "payment_method_types": ["card"],
        "off_session": True,
        "confirmation_method": "automatic",
        "last_payment_error": None,
        "next_action": None,
        "livemode": False,
        "created": CREATED - 5,
        "status": status,
        **fields,
    }


DECLINE = {
    "code": "card_declined",
    "decline_code": "generic_decline",
    "doc_url": "https://stripe.com/docs/error-codes/card-declined",
    "message": "Your card was declined.",
    "type": "card_error",
    "payment_method": {
        "id": "pm_T1",
        "object": "payment_method",
        "card": {"brand": "visa", "last4": "0002", "exp_month": 12, "exp_year": 2030},
        "type": "card",
    },
}
AUTHENTICATION_REQUIRED = {
    "code": "authentication_required",
    "decline_code": "authentication_required",
    "message": "Your card was declined. This transaction requires authentication.",
    "type": "card_error",
}
CARD = {"brand": "visa", "last4": "4242", "exp_month": 12, "exp_year": 2030, "funding": "credit"}


def payment_method_detached() -> dict[str, Any]:
    pm = {
        "id": _id("pm"),
        "object": "payment_method",
        "billing_details": {"email": None, "name": None},
        "card": CARD,
        "customer": None,
        "type": "card",
        "created": CREATED - 100,
    }
    return event("payment_method.detached", pm, previous={"customer": "cus_T1"})


def setup_intent_succeeded() -> dict[str, Any]:
    seti = {
        "id": _id("seti"),
        "object": "setup_intent",
        "client_secret": "seti_x_secret_y",
        "customer": "cus_T1",
        "payment_method": "pm_T1",
        "status": "succeeded",
        "usage": "off_session",
        "created": CREATED - 60,
    }
    return event("setup_intent.succeeded", seti)


def charge_refunded(payment_intent_id: str | None, refunded_cents: int) -> dict[str, Any]:
    charge = {
        "id": _id("ch"),
        "object": "charge",
        "amount": 2000,
        "amount_captured": 2000,
        "amount_refunded": refunded_cents,
        "currency": "usd",
        "customer": "cus_T1",
        "payment_intent": payment_intent_id,
        "payment_method_details": {"card": CARD, "type": "card"},
        "refunded": refunded_cents == 2000,
        "status": "succeeded",
    }
    return event("charge.refunded", charge, previous={"amount_refunded": 0})


def dispute_created() -> dict[str, Any]:
    dispute = {
        "id": _id("dp"),
        "object": "dispute",
        "amount": 2000,
        "charge": "ch_T1",
        "currency": "usd",
        "payment_intent": "pi_T1",
        "reason": "fraudulent",
        "status": "needs_response",
        "created": CREATED - 1,
    }
    return event("charge.dispute.created", dispute)


def stripe_signature(body: bytes, secret: str = SECRET, timestamp: int | None = None) -> str:
    """The header exactly as Stripe builds it."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


# A server on a real port


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """SQLite, unless a test asks for both backends with `BOTH_BACKENDS`."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database(f"webhooks_{next(_databases)}")


BOTH_BACKENDS = pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)


@dataclass
class Endpoint:
    app: Application
    sink: RecordingSink
    http: httpx.AsyncClient
    url: str

    async def post(
        self, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        raw = body if isinstance(body, bytes) else json.dumps(body, indent=2).encode()
        if headers is None:
            headers = {"Stripe-Signature": stripe_signature(raw)}
        headers = {"Content-Type": "application/json; charset=utf-8", **headers}
        return await self.http.post(self.url, content=raw, headers=headers)

    async def recorded(self) -> list[tuple[str, str]]:
        async with self.app.engine.connect() as conn:
            rows = await conn.execute(select(stripe_events.c.event_id, stripe_events.c.type))
            return [(row.event_id, row.type) for row in rows]


def webhook_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "listen_address": "127.0.0.1:0",
        "webhook_port": free_port(),
        "stripe_webhook_secret": SECRET,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture
async def endpoint(database_url: str) -> AsyncIterator[Endpoint]:
    settings = webhook_settings(database_url)
    sink = RecordingSink()
    app = await Application.start(settings, stripe_event_sink=sink)
    url = f"http://127.0.0.1:{settings.webhook_port}{WEBHOOK_PATH}"
    try:
        async with httpx.AsyncClient(timeout=_WAIT_S) as http:
            yield Endpoint(app, sink, http, url)
    finally:
        await app.stop(grace_s=0)


# Signatures


@BOTH_BACKENDS
async def test_a_signed_event_reaches_the_sink_and_is_recorded(endpoint: Endpoint) -> None:
    succeeded = event("payment_intent.succeeded", payment_intent("succeeded"))

    answer = await endpoint.post(succeeded)

    assert answer.status_code == 200
    assert [name for name, _ in endpoint.sink.calls] == ["payment_intent_succeeded"]
    assert await endpoint.recorded() == [(succeeded["id"], "payment_intent.succeeded")]


def _forged(body: bytes) -> dict[str, str]:
    return {"Stripe-Signature": stripe_signature(body, secret="whsec_someone_else")}


def _stale(body: bytes) -> dict[str, str]:
    return {"Stripe-Signature": stripe_signature(body, timestamp=int(time.time()) - 301)}


def _tampered_signature(body: bytes) -> dict[str, str]:
    header = stripe_signature(body)
    return {"Stripe-Signature": header[:-1] + ("0" if header[-1] != "0" else "1")}


REJECTED: dict[str, Callable[[bytes], dict[str, str]]] = {
    "forged with another secret": _forged,
    "stale": _stale,
    "missing": lambda body: {},
    "empty": lambda body: {"Stripe-Signature": ""},
    "not a signature header": lambda body: {"Stripe-Signature": "garbage"},
    "no v1 scheme": lambda body: {"Stripe-Signature": f"t={int(time.time())},v0=abc"},
    "one digit changed": _tampered_signature,
}


@pytest.mark.parametrize("case", REJECTED)
async def test_an_unverified_delivery_is_rejected_and_changes_nothing(
    endpoint: Endpoint, case: str
) -> None:
    body = json.dumps(event("payment_intent.succeeded", payment_intent("succeeded"))).encode()

    answer = await endpoint.post(body, REJECTED[case](body))

    assert answer.status_code == 400
    assert endpoint.sink.calls == []
    assert await endpoint.recorded() == []


async def test_a_body_changed_after_signing_is_rejected(endpoint: Endpoint) -> None:
    signed = event("payment_intent.succeeded", payment_intent("succeeded"))
    header = {"Stripe-Signature": stripe_signature(json.dumps(signed).encode())}
    signed["data"]["object"]["amount"] = 200_000

    answer = await endpoint.post(json.dumps(signed).encode(), header)

    assert answer.status_code == 400
    assert endpoint.sink.calls == []
    assert await endpoint.recorded() == []


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"\xff\xfe not utf-8",
        b'["an", "array"]',
        b'{"object": "customer", "id": "cus_1"}',
        json.dumps({**event("payment_intent.succeeded", {}), "data": None}).encode(),
        json.dumps({**event("payment_intent.succeeded", {}), "created": "yesterday"}).encode(),
        json.dumps(event("payment_intent.succeeded", {"id": "pi_1", "amount": "20.00"})).encode(),
        json.dumps(event("payment_intent.succeeded", {"id": "pi_1", "amount": True})).encode(),
    ],
    ids=[
        "not json",
        "not utf-8",
        "not an object",
        "not an event",
        "no data",
        "bad created",
        "amount a string",
        "amount a bool",
    ],
)
async def test_a_signed_body_that_is_not_a_readable_event_is_rejected(
    endpoint: Endpoint, body: bytes
) -> None:
    answer = await endpoint.post(body, {"Stripe-Signature": stripe_signature(body)})

    assert answer.status_code == 400
    assert endpoint.sink.calls == []
    assert await endpoint.recorded() == []


async def test_the_tolerance_window_is_configurable(database_url: str) -> None:
    settings = webhook_settings(database_url, stripe_webhook_tolerance_s=30)
    sink = RecordingSink()
    app = await Application.start(settings, stripe_event_sink=sink)
    url = f"http://127.0.0.1:{settings.webhook_port}{WEBHOOK_PATH}"
    try:
        async with httpx.AsyncClient(timeout=_WAIT_S) as http:
            body = json.dumps(event("setup_intent.succeeded", {"id": "seti_1"})).encode()
            minute_old = stripe_signature(body, timestamp=int(time.time()) - 60)
            old = await http.post(url, content=body, headers={"Stripe-Signature": minute_old})
            fresh = await http.post(
                url, content=body, headers={"Stripe-Signature": stripe_signature(body)}
            )
    finally:
        await app.stop(grace_s=0)
    assert (old.status_code, fresh.status_code) == (400, 200)
    assert [name for name, _ in sink.calls] == ["setup_intent_succeeded"]


# Exactly once


@BOTH_BACKENDS
async def test_a_duplicate_delivery_reaches_the_sink_once(endpoint: Endpoint) -> None:
    succeeded = event("payment_intent.succeeded", payment_intent("succeeded"))

    first = await endpoint.post(succeeded)
    # Stripe signs every delivery attempt anew.
    again = await endpoint.post(
        json.dumps(succeeded).encode(),
        {"Stripe-Signature": stripe_signature(json.dumps(succeeded).encode())},
    )

    assert (first.status_code, again.status_code) == (200, 200)
    assert again.json() == {"outcome": "duplicate"}
    assert len(endpoint.sink.calls) == 1
    assert await endpoint.recorded() == [(succeeded["id"], "payment_intent.succeeded")]


@BOTH_BACKENDS
async def test_concurrent_deliveries_of_one_event_reach_the_sink_once(endpoint: Endpoint) -> None:
    succeeded = event("payment_intent.succeeded", payment_intent("succeeded"))

    answers = await asyncio.gather(*(endpoint.post(succeeded) for _ in range(8)))

    assert [a.status_code for a in answers] == [200] * 8
    assert len(endpoint.sink.calls) == 1
    assert len(await endpoint.recorded()) == 1


@BOTH_BACKENDS
async def test_a_failing_sink_gets_5xx_and_the_redelivery_is_processed(
    endpoint: Endpoint,
) -> None:
    failed = event("payment_intent.payment_failed", payment_intent("requires_payment_method"))
    endpoint.sink.failures = 1

    first = await endpoint.post(failed)
    assert first.status_code == 500
    assert endpoint.sink.calls == []
    assert await endpoint.recorded() == []

    redelivered = await endpoint.post(failed)
    assert redelivered.status_code == 200
    assert [name for name, _ in endpoint.sink.calls] == ["payment_intent_failed"]
    assert await endpoint.recorded() == [(failed["id"], "payment_intent.payment_failed")]


class BlockingSink(RecordingSink):
    """Stops inside the first fact until `release` is set."""

    def __init__(self, error: Exception | None = None) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.error = error

    async def setup_intent_succeeded(self, **facts: Any) -> None:
        self.entered.set()
        await self.release.wait()
        if self.error is not None:
            raise self.error
        await self._record("setup_intent_succeeded", facts)


async def _start_with(
    sink: RecordingSink, tmp_path: Path, **overrides: Any
) -> tuple[Application, str]:
    settings = webhook_settings(f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}", **overrides)
    app = await Application.start(settings, stripe_event_sink=sink)
    return app, f"http://127.0.0.1:{settings.webhook_port}{WEBHOOK_PATH}"


async def _post_signed(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> httpx.Response:
    raw = json.dumps(body).encode()
    return await http.post(url, content=raw, headers={"Stripe-Signature": stripe_signature(raw)})


async def test_a_database_fault_in_the_sink_gets_503_and_nothing_recorded(tmp_path: Path) -> None:
    sink = BlockingSink(Unavailable(ErrorReason.STORAGE_UNAVAILABLE, "the database is down"))
    sink.release.set()
    app, url = await _start_with(sink, tmp_path)
    try:
        async with httpx.AsyncClient(timeout=_WAIT_S) as http:
            answer = await _post_signed(http, url, setup_intent_succeeded())
        async with app.engine.connect() as conn:
            recorded = (await conn.execute(select(stripe_events))).all()
    finally:
        await app.stop(grace_s=0)
    assert answer.status_code == 503
    assert recorded == []


async def test_a_sink_slower_than_the_timeout_gets_503_so_stripe_redelivers(
    tmp_path: Path,
) -> None:
    sink = BlockingSink()  # never released
    app, url = await _start_with(sink, tmp_path, stripe_webhook_timeout_s=0.1)
    try:
        async with httpx.AsyncClient(timeout=_WAIT_S) as http:
            answer = await _post_signed(http, url, setup_intent_succeeded())
    finally:
        await app.stop(grace_s=0)
    assert answer.status_code == 503
    assert sink.calls == []


class _LogSeen(logging.Handler):
    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


async def test_stopping_lets_a_delivery_in_flight_finish(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="billing_service.payments.webhooks")
    sink = BlockingSink()
    app, url = await _start_with(sink, tmp_path)
    succeeded = setup_intent_succeeded()
    async with httpx.AsyncClient(timeout=_WAIT_S) as http:
        delivery = asyncio.create_task(_post_signed(http, url, succeeded))
        async with asyncio.timeout(_WAIT_S):
            await sink.entered.wait()
        closing = _LogSeen("closing the Stripe webhook endpoint")
        logging.getLogger("billing_service.payments.webhooks").addHandler(closing)
        try:
            stopping = asyncio.create_task(app.stop())
            async with asyncio.timeout(_WAIT_S):
                await closing.seen.wait()
        finally:
            logging.getLogger("billing_service.payments.webhooks").removeHandler(closing)
        sink.release.set()
        answer = await delivery
        await stopping
        with pytest.raises(httpx.ConnectError):
            await _post_signed(http, url, setup_intent_succeeded())
    assert answer.status_code == 200
    assert [name for name, _ in sink.calls] == ["setup_intent_succeeded"]


@BOTH_BACKENDS
async def test_distinct_events_of_one_object_each_reach_the_sink(endpoint: Endpoint) -> None:
    intent = payment_intent("succeeded")
    # Stripe sends a new event (a new id) for each change; each is a fact of its own, and
    # putting them in order is the sink's job.
    await endpoint.post(event("payment_intent.succeeded", intent))
    await endpoint.post(event("payment_intent.payment_failed", intent))

    assert [name for name, _ in endpoint.sink.calls] == [
        "payment_intent_succeeded",
        "payment_intent_failed",
    ]
    assert len(await endpoint.recorded()) == 2


async def test_unhandled_types_are_acknowledged_and_ignored(endpoint: Endpoint) -> None:
    created = event("customer.created", {"id": "cus_T1", "object": "customer"})

    answer = await endpoint.post(created)

    assert answer.status_code == 200
    assert answer.json() == {"outcome": "ignored"}
    assert endpoint.sink.calls == []
    assert await endpoint.recorded() == []


# The facts of each handled type

OCCURRED = datetime.fromtimestamp(CREATED, UTC)


async def test_payment_intent_succeeded_facts(endpoint: Endpoint) -> None:
    intent = payment_intent("succeeded")
    await endpoint.post(event("payment_intent.succeeded", intent))

    assert endpoint.sink.calls == [
        (
            "payment_intent_succeeded",
            PaymentIntentFacts(
                payment_intent_id=intent["id"],
                customer_id="cus_T1",
                amount_cents=2000,
                charge_id="chg_1",
                failure_message=None,
                occurred_at=OCCURRED,
            ),
        )
    ]


async def test_payment_intent_failed_facts_carry_the_decline_message(endpoint: Endpoint) -> None:
    intent = payment_intent("requires_payment_method", last_payment_error=DECLINE, amount=1234)
    await endpoint.post(event("payment_intent.payment_failed", intent))

    assert endpoint.sink.calls == [
        (
            "payment_intent_failed",
            PaymentIntentFacts(
                payment_intent_id=intent["id"],
                customer_id="cus_T1",
                amount_cents=1234,
                charge_id="chg_1",
                failure_message="Your card was declined.",
                occurred_at=OCCURRED,
            ),
        )
    ]


async def test_payment_intent_requires_action_facts(endpoint: Endpoint) -> None:
    intent = payment_intent(
        "requires_action",
        last_payment_error=AUTHENTICATION_REQUIRED,
        next_action={
            "type": "use_stripe_sdk",
            "use_stripe_sdk": {"type": "three_d_secure_redirect"},
        },
    )
    await endpoint.post(event("payment_intent.requires_action", intent))

    name, facts = endpoint.sink.calls[0]
    assert name == "payment_intent_requires_action"
    assert facts == PaymentIntentFacts(
        payment_intent_id=intent["id"],
        customer_id="cus_T1",
        amount_cents=2000,
        charge_id="chg_1",
        failure_message="Your card was declined. This transaction requires authentication.",
        occurred_at=OCCURRED,
    )


async def test_an_intent_we_did_not_create_has_no_charge_id(endpoint: Endpoint) -> None:
    expanded_customer = {"id": "cus_T2", "object": "customer"}
    intent = payment_intent("succeeded", metadata={}, customer=expanded_customer)
    await endpoint.post(event("payment_intent.succeeded", intent))

    _, facts = endpoint.sink.calls[0]
    assert (facts.charge_id, facts.customer_id) == (None, "cus_T2")


async def test_payment_method_detached_names_the_former_customer(endpoint: Endpoint) -> None:
    detached = payment_method_detached()
    await endpoint.post(detached)

    assert endpoint.sink.calls == [
        (
            "payment_method_detached",
            {
                "payment_method_id": detached["data"]["object"]["id"],
                "customer_id": "cus_T1",
                "occurred_at": OCCURRED,
            },
        )
    ]


async def test_setup_intent_succeeded_facts(endpoint: Endpoint) -> None:
    succeeded = setup_intent_succeeded()
    await endpoint.post(succeeded)

    assert endpoint.sink.calls == [
        (
            "setup_intent_succeeded",
            {
                "setup_intent_id": succeeded["data"]["object"]["id"],
                "customer_id": "cus_T1",
                "payment_method_id": "pm_T1",
                "occurred_at": OCCURRED,
            },
        )
    ]


async def test_charge_refunded_reports_the_cumulative_amount(endpoint: Endpoint) -> None:
    await endpoint.post(charge_refunded("pi_T1", 500))
    await endpoint.post(charge_refunded("pi_T1", 2000))

    assert endpoint.sink.calls == [
        (
            "charge_refunded",
            {"payment_intent_id": "pi_T1", "amount_refunded_cents": cents, "occurred_at": OCCURRED},
        )
        for cents in (500, 2000)
    ]


async def test_a_refunded_charge_without_an_intent_is_ignored(endpoint: Endpoint) -> None:
    answer = await endpoint.post(charge_refunded(None, 500))

    assert answer.status_code == 200
    assert endpoint.sink.calls == []


async def test_dispute_created_facts(endpoint: Endpoint) -> None:
    await endpoint.post(dispute_created())

    assert endpoint.sink.calls == [
        (
            "dispute_created",
            {"payment_intent_id": "pi_T1", "customer_id": None, "occurred_at": OCCURRED},
        )
    ]


# Delivered by localstripe itself


async def test_localstripe_delivers_a_signed_payment_intent_succeeded(endpoint: Endpoint) -> None:
    # A localstripe of its own: its webhooks cannot be unregistered, and would otherwise
    # deliver other tests' events to this test's server after it stopped.
    with LocalStripe() as emulator:
        emulator.register_webhook("billing", endpoint.url, SECRET)
        client = stripe.StripeClient(API_KEY, base_addresses={"api": emulator.url})
        customer = await client.v1.customers.create_async({"email": "t1@example.com"})
        card = await client.v1.payment_methods.create_async(
            {
                "type": "card",
                "card": {
                    "number": "4242424242424242",
                    "exp_month": 12,
                    "exp_year": 2030,
                    "cvc": "123",
                },
            }
        )
        await client.v1.payment_methods.attach_async(card.id, {"customer": customer.id})
        intent = await client.v1.payment_intents.create_async(
            {
                "amount": 2500,
                "currency": "usd",
                "customer": customer.id,
                "payment_method": card.id,
                "off_session": True,
                "confirm": True,
                "metadata": {"charge_id": "chg_local"},
            }
        )

        _, facts = await endpoint.sink.wait_for(
            lambda call: (
                call[0] == "payment_intent_succeeded" and call[1].payment_intent_id == intent.id
            )
        )

    assert facts.customer_id == customer.id
    assert facts.amount_cents == 2500
    assert facts.charge_id == "chg_local"
    recorded_types = [type_ for _, type_ in await endpoint.recorded()]
    assert "payment_intent.succeeded" in recorded_types


# Nothing secret in the logs


async def test_neither_the_secret_nor_card_details_are_logged(
    endpoint: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    detached = payment_method_detached()
    body = json.dumps(detached).encode()

    await endpoint.post(body, _forged(body))
    await endpoint.post(detached)
    endpoint.sink.failures = 1
    await endpoint.post(payment_method_detached())

    assert "stripe webhook rejected" in caplog.text
    assert detached["id"] in caplog.text
    for secret in (SECRET, "last4", "exp_year", "v1="):
        assert secret not in caplog.text


# Configuration


async def test_the_endpoint_is_off_by_default(tmp_path: Path) -> None:
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}", listen_address="127.0.0.1:0"
    )
    assert settings.webhook_port == 0

    app = await Application.start(settings)
    try:
        assert app.webhook_server is None
    finally:
        await app.stop(grace_s=0)


async def test_the_secret_can_come_from_a_mounted_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "webhook-secret"
    secret_file.write_text(SECRET + "\n")
    settings = webhook_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}",
        stripe_webhook_secret=None,
        stripe_webhook_secret_file=secret_file,
    )
    assert load_webhook_secret(settings) == SECRET

    sink = RecordingSink()
    app = await Application.start(settings, stripe_event_sink=sink)
    try:
        body = json.dumps(setup_intent_succeeded()).encode()
        async with httpx.AsyncClient(timeout=_WAIT_S) as http:
            answer = await http.post(
                f"http://127.0.0.1:{settings.webhook_port}{WEBHOOK_PATH}",
                content=body,
                headers={"Stripe-Signature": stripe_signature(body)},
            )
    finally:
        await app.stop(grace_s=0)
    assert answer.status_code == 200
    assert len(sink.calls) == 1


def test_a_webhook_port_without_a_secret_is_a_configuration_error() -> None:
    with pytest.raises(ValidationError, match="BILLING_STRIPE_WEBHOOK_SECRET"):
        Settings(webhook_port=8443)
    with pytest.raises(ValidationError, match="not both"):
        Settings(webhook_port=8443, stripe_webhook_secret=SECRET, stripe_webhook_secret_file="/s")
    with pytest.raises(ValidationError, match="BILLING_STRIPE_WEBHOOK_SECRET"):
        Settings(webhook_port=8443, stripe_webhook_secret="")


@pytest.mark.parametrize("content", [None, "", "  \n"], ids=["missing", "empty", "blank"])
def test_an_unusable_secret_file_is_a_configuration_error(
    tmp_path: Path, content: str | None
) -> None:
    secret_file = tmp_path / "webhook-secret"
    if content is not None:
        secret_file.write_text(content)
    settings = Settings(webhook_port=8443, stripe_webhook_secret_file=secret_file)

    with pytest.raises(ConfigError, match="BILLING_STRIPE_WEBHOOK_SECRET_FILE"):
        load_webhook_secret(settings)


async def test_by_default_the_endpoint_feeds_the_payments_core(tmp_path: Path) -> None:
    settings = webhook_settings(f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}")
    app = await Application.start(settings)
    url = f"http://127.0.0.1:{settings.webhook_port}{WEBHOOK_PATH}"
    try:
        assert app.payments_sink is not None
        async with httpx.AsyncClient(timeout=_WAIT_S) as http:
            # A refund of a PaymentIntent we never created: acknowledged, recorded, no effect.
            refunded = event("charge.refunded", charge_refunded("pi_unknown", 500))
            answer = await _post_signed(http, url, refunded)
        assert answer.status_code == 200
        async with app.engine.connect() as conn:
            rows = await conn.execute(select(stripe_events.c.event_id))
            assert [row.event_id for row in rows] == [refunded["id"]]
    finally:
        await app.stop(grace_s=0)


def test_check_config_names_the_missing_webhook_secret(tmp_path: Path) -> None:
    result = run_cli("check-config", cwd=tmp_path, BILLING_WEBHOOK_PORT="8443")
    assert result.returncode == 2
    assert "BILLING_WEBHOOK_PORT" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    secret_file = tmp_path / "absent"
    result = run_cli(
        "check-config",
        cwd=tmp_path,
        BILLING_WEBHOOK_PORT="8443",
        BILLING_STRIPE_WEBHOOK_SECRET_FILE=str(secret_file),
    )
    assert result.returncode == 2
    assert "BILLING_STRIPE_WEBHOOK_SECRET_FILE" in result.stderr
