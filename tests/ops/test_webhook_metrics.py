"""billing_webhook_events_total: each delivery to the Stripe webhook endpoint counted once, by
what became of it, scraped from a real server's /metrics."""

from __future__ import annotations

from pathlib import Path

import httpx

from billing_service.app import Application
from billing_service.payments.webhooks import WEBHOOK_PATH
from tests.ops.test_metrics import scrape, value
from tests.payments.test_webhooks import (
    RecordingSink,
    event,
    payment_intent,
    stripe_signature,
    webhook_settings,
)
from tests.support.ports import free_port


async def test_every_delivery_is_counted_by_outcome(tmp_path: Path) -> None:
    sink = RecordingSink()
    settings = webhook_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}", metrics_port=free_port()
    )
    app = await Application.start(settings, stripe_event_sink=sink)
    url = f"http://127.0.0.1:{settings.webhook_port}{WEBHOOK_PATH}"
    succeeded = event("payment_intent.succeeded", payment_intent("succeeded"))
    failed = event("payment_intent.payment_failed", payment_intent("requires_payment_method"))
    unhandled = event("customer.updated", {"id": "cus_1", "object": "customer"})

    async def post(body: bytes, signature: str | None = None) -> int:
        headers = {"Stripe-Signature": signature or stripe_signature(body)}
        answer = await http.post(url, content=body, headers=headers)
        return answer.status_code

    def raw(body: object) -> bytes:
        return httpx.Request("POST", url, json=body).content

    try:
        async with httpx.AsyncClient(timeout=10) as http:
            statuses = [
                await post(raw(succeeded)),  # applied
                await post(raw(succeeded)),  # duplicate
                await post(raw(succeeded), stripe_signature(b"x", secret="whsec_other")),
                await post(b"not json"),  # signed, but not an event: rejected
                await post(raw(unhandled)),  # ignored
            ]
            sink.failures = 1
            statuses.append(await post(raw(failed)))  # the sink failed: Stripe redelivers
            statuses.append(await post(raw(failed)))  # the redelivery applied
        assert statuses == [200, 200, 400, 400, 200, 500, 200]
        samples = await scrape(app)
    finally:
        await app.stop(grace_s=0)

    def counted(outcome: str) -> float:
        return value(samples, "billing_webhook_events_total", outcome=outcome)

    assert {
        outcome: counted(outcome)
        for outcome in ("applied", "duplicate", "rejected", "ignored", "failed")
    } == {"applied": 2, "duplicate": 1, "rejected": 2, "ignored": 1, "failed": 1}
