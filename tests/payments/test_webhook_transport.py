"""The webhook endpoint's transport limits: a client that sends its headers or its body a byte
at a time is disconnected after the read timeout, many of them do not keep a real delivery
out, and connections beyond the limit are refused at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from billing_service.app import Application
from billing_service.payments.webhooks import WEBHOOK_PATH
from tests.payments.test_webhooks import (
    RecordingSink,
    event,
    payment_intent,
    stripe_signature,
    webhook_settings,
)

READ_TIMEOUT_S = 1.0
# A slow client sends one byte per pace: its whole delivery would take far longer than the
# read timeout, so only the server can end it early.
PACE_S = 0.1
# How long a test waits for the server to close a connection before failing.
GIVE_UP_S = 60.0


@dataclass
class Webhooks:
    app: Application
    sink: RecordingSink
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{WEBHOOK_PATH}"


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"


@pytest.fixture
async def webhooks(database_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Webhooks]:
    overrides: dict[str, Any] = {"webhook_read_timeout_s": READ_TIMEOUT_S}
    overrides.update(getattr(request, "param", {}))
    settings = webhook_settings(database_url, **overrides)
    sink = RecordingSink()
    app = await Application.start(settings, stripe_event_sink=sink)
    try:
        yield Webhooks(app, sink, settings.webhook_port)
    finally:
        await app.stop(grace_s=0)


def delivery() -> tuple[bytes, bytes]:
    """A signed delivery as Stripe sends it: its header block and its body."""
    body = json.dumps(event("payment_intent.succeeded", payment_intent("succeeded"))).encode()
    headers = (
        f"POST {WEBHOOK_PATH} HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Stripe-Signature: {stripe_signature(body)}\r\n"
        "\r\n"
    ).encode()
    return headers, body


async def post(http: httpx.AsyncClient, webhooks: Webhooks) -> httpx.Response:
    """One signed delivery, sent at once."""
    body = json.dumps(event("payment_intent.succeeded", payment_intent("succeeded"))).encode()
    headers = {"Stripe-Signature": stripe_signature(body), "Content-Type": "application/json"}
    try:
        return await http.post(webhooks.url, content=body, headers=headers)
    except httpx.TransportError:
        return httpx.Response(503)


@dataclass
class SlowClient:
    finished_sending: bool
    open_s: float


async def slow_client(port: int, slow_part: str) -> SlowClient:
    """Sends a delivery with its `slow_part` ("headers" or "body") one byte per PACE_S, until the
    server closes the connection; says whether it got to send everything."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = loop.time()
    headers, body = delivery()
    fast, slow = (b"", headers + body) if slow_part == "headers" else (headers, body)
    closed = asyncio.ensure_future(reader.read())  # until EOF: the server closed
    finished = True
    try:
        writer.write(fast)
        for index in range(len(slow)):
            writer.write(slow[index : index + 1])
            await writer.drain()
            # Paces the client, and stops as soon as the server has closed the connection.
            done, _ = await asyncio.wait([closed], timeout=PACE_S)
            if done:
                finished = False
                break
    except ConnectionError:
        finished = False
    async with asyncio.timeout(GIVE_UP_S):
        with contextlib.suppress(ConnectionError):
            await closed
    writer.close()
    return SlowClient(finished, loop.time() - started)


@pytest.mark.parametrize("slow_part", ["headers", "body"])
async def test_a_client_that_sends_a_byte_at_a_time_is_disconnected(
    webhooks: Webhooks, slow_part: str
) -> None:
    client = await slow_client(webhooks.port, slow_part)
    assert not client.finished_sending, f"the server waited {client.open_s:.1f}s for it all"
    assert webhooks.sink.calls == []


async def test_forty_slow_clients_neither_keep_a_delivery_out_nor_stay_connected(
    webhooks: Webhooks,
) -> None:
    slow = [
        asyncio.ensure_future(slow_client(webhooks.port, "body" if n % 2 else "headers"))
        for n in range(40)
    ]
    async with httpx.AsyncClient(timeout=GIVE_UP_S) as http:
        answer = await post(http, webhooks)
    assert answer.status_code == 200
    assert [name for name, _ in webhooks.sink.calls] == ["payment_intent_succeeded"]
    clients = await asyncio.gather(*slow)
    assert not any(client.finished_sending for client in clients)


@pytest.mark.parametrize(
    "webhooks",
    [{"webhook_max_connections": 5, "webhook_read_timeout_s": GIVE_UP_S}],
    indirect=True,
)
async def test_connections_beyond_the_limit_are_refused_at_once(webhooks: Webhooks) -> None:
    idle = [await asyncio.open_connection("127.0.0.1", webhooks.port) for _ in range(5)]
    reader, writer = await asyncio.open_connection("127.0.0.1", webhooks.port)
    async with asyncio.timeout(GIVE_UP_S / 2):
        answer = await reader.read()  # the server answers and closes without being asked
    assert answer.startswith(b"HTTP/1.1 503"), answer
    writer.close()
    for _, idle_writer in idle:
        idle_writer.close()
        await idle_writer.wait_closed()
    async with httpx.AsyncClient(timeout=GIVE_UP_S) as http:
        # The server notices the closed connections on its next turns; as Stripe does, a
        # refused delivery is sent again.
        for _ in range(50):
            answer_now = await post(http, webhooks)
            if answer_now.status_code != 503:
                break
    assert answer_now.status_code == 200
