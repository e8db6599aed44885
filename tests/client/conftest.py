"""A real server on a real port for the client tests, run on its own event loop in a thread so
that the blocking client can call it from the test's thread; over SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from billing.client import BillingClient
from billing.v1 import admin_pb2
from billing_service.app import Application
from billing_service.config import Settings
from tests.api.conftest import database_url  # noqa: F401 - the sqlite/postgresql parameter
from tests.support.clock import FakeClock

# One token of any kind costs one micro: amounts in tests are exact and easy to read.
PRICES = """
[models."unit-priced"]
billing = "metered"
input_micros_per_mtok = 1_000_000
output_micros_per_mtok = 1_000_000

[models."unit-included"]
billing = "included"
input_micros_per_mtok = 1_000_000
output_micros_per_mtok = 1_000_000
"""

LIMIT = 1_000_000
CHAT_TOKEN = "chat-token-0123456789abcdef"
OPERATOR_TOKEN = "operator-token-0123456789abcdef"

_T = TypeVar("_T")


class CallLog(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts the calls each method received, can run a coroutine when a call of a method
    arrives (before the server handles it), and can drop the response of the next call of a
    method after the server has fully processed it (the client then sees UNAVAILABLE)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._drop_next: set[str] = set()
        self._on_arrival: dict[str, Callable[[], Awaitable[None]]] = {}

    def __getitem__(self, method: str) -> int:
        return self.calls[method]

    def drop_next_response(self, method: str) -> None:
        self._drop_next.add(method)

    def on_arrival(self, method: str, action: Callable[[], Awaitable[None]]) -> None:
        """Runs `action` on the server's loop when the next call of `method` arrives."""
        self._on_arrival[method] = action

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        method = details.method.rsplit("/", 1)[-1]
        self.calls[method] += 1
        action = self._on_arrival.pop(method, None)
        if action is not None:
            await action()
        if handler is None or handler.unary_unary is None or method not in self._drop_next:
            return handler
        self._drop_next.discard(method)
        inner = handler.unary_unary

        async def processed_then_dropped(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            await inner(request, context)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "response lost on the way back")

        return grpc.unary_unary_rpc_method_handler(
            processed_then_dropped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class ServerThread:
    """An Application serving on 127.0.0.1 from its own event loop in a daemon thread."""

    def __init__(self, settings: Settings, clock: FakeClock, calls: CallLog) -> None:
        self.clock = clock
        self.calls = calls
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.app = self.run(Application.start(settings, clock=clock, interceptors=[calls]))

    def run(self, coroutine: Awaitable[_T]) -> _T:
        async def wrapped() -> _T:
            return await coroutine

        return asyncio.run_coroutine_threadsafe(wrapped(), self._loop).result(timeout=60)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    def stop(self) -> None:
        try:
            self.run(self.app.stop(grace_s=0))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=60)
            self._loop.close()


@pytest.fixture
def prices(tmp_path: Path) -> Path:
    path = tmp_path / "prices.toml"
    path.write_text(PRICES)
    return path


def start_server(url: str, prices: Path, **overrides: Any) -> ServerThread:
    settings = Settings(
        database_url=url,
        listen_address="127.0.0.1:0",
        price_table=prices,
        expiry_sweep_interval_s=0.05,
        log_format="text",
        **overrides,
    )
    return ServerThread(settings, FakeClock(), CallLog())


@pytest.fixture
def server(database_url: str, prices: Path) -> Iterator[ServerThread]:  # noqa: F811
    running = start_server(database_url, prices)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def token_server(database_url: str, prices: Path) -> Iterator[ServerThread]:  # noqa: F811
    running = start_server(
        database_url,
        prices,
        auth_tokens=f"chat-service={CHAT_TOKEN}, operator={OPERATOR_TOKEN}",
    )
    try:
        yield running
    finally:
        running.stop()


def rid() -> str:
    return str(uuid.uuid4())


def create_tenant(
    client: BillingClient, tenant_id: str, *, card: bool = True, limit: int = LIMIT
) -> None:
    client.admin.CreateTenant(
        admin_pb2.CreateTenantRequest(
            request_id=rid(),
            tenant_id=tenant_id,
            payment_method_on_file=card,
            credit_limit_micros=limit,
        ),
        timeout=10,
    )


def balance(client: BillingClient, tenant_id: str) -> admin_pb2.Balance:
    response = client.admin.GetTenant(admin_pb2.GetTenantRequest(tenant_id=tenant_id), timeout=10)
    return response.tenant.balance
