"""Transport limits: a passed deadline does no work, message size, keepalive options, and the
warning for an unauthenticated server on a public address."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select

from billing.v1 import billing_pb2, billing_pb2_grpc
from billing_service.api.transport import exposure_warning, server_options
from billing_service.app import Application
from billing_service.config import Settings
from billing_service.storage.tables import holds, tenants
from tests.ops.conftest import RunningServer
from tests.support.grpc_errors import rich_error

WAIT_S = 60.0


class LoopBlocker(grpc.aio.ServerInterceptor):
    """Runs first on ReserveCredit calls and blocks the server's event loop until `released`.

    While the loop is blocked the server cannot see the client give up, so the call reaches the
    built-in guard with its deadline passed but not yet cancelled: the case the guard checks.
    """

    def __init__(self) -> None:
        self.released = threading.Event()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if not handler_call_details.method.endswith("/ReserveCredit"):
            return handler
        inner = handler.unary_unary
        assert inner is not None

        async def blocked(request: Any, context: Any) -> Any:
            assert self.released.wait(WAIT_S), "the client never gave up"
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            blocked, handler.request_deserializer, handler.response_serializer
        )


class AccessLog(logging.Handler):
    """Collects the access log lines and signals each one."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self.arrived = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.arrived.set()


@pytest.fixture
def access_log() -> Iterator[AccessLog]:
    handler = AccessLog()
    logger = logging.getLogger("billing_service.access")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


async def row_count(app: Application) -> int:
    async with app.engine.connect() as conn:
        counts = [
            (await conn.execute(select(func.count()).select_from(table))).scalar_one()
            for table in (tenants, holds)
        ]
    return sum(counts)


def reserve_request(**fields: Any) -> billing_pb2.ReserveCreditRequest:
    values: dict[str, Any] = {
        "request_id": str(uuid.uuid4()),
        "tenant_id": "acme",
        "user_id": "u",
        "model": "unit-priced",
        "amount_micros": 10,
    }
    values.update(fields)
    return billing_pb2.ReserveCreditRequest(**values)


async def test_a_call_whose_deadline_passed_before_its_handler_does_no_work(
    running_server: RunningServer, access_log: AccessLog
) -> None:
    blocker = LoopBlocker()
    async with running_server(interceptors=[blocker]) as app:
        address = f"127.0.0.1:{app.port}"

        def give_up_at_the_deadline() -> grpc.StatusCode:
            # A blocking client in a thread: the server's event loop (this one) is blocked.
            with grpc.insecure_channel(address) as channel:
                try:
                    billing_pb2_grpc.BillingServiceStub(channel).ReserveCredit(
                        reserve_request(), timeout=0.5
                    )
                except grpc.RpcError as error:
                    return error.code()
                finally:
                    blocker.released.set()
            return grpc.StatusCode.OK

        client = asyncio.get_running_loop().run_in_executor(None, give_up_at_the_deadline)
        assert await asyncio.wait_for(client, WAIT_S) == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(access_log.arrived.wait(), WAIT_S)
        (record,) = access_log.records
        assert record.__dict__["grpc_code"] == "DEADLINE_EXCEEDED"
        assert await row_count(app) == 0  # the servicer never ran: no tenant, no hold


async def test_a_message_over_the_size_limit_is_refused_before_any_work(
    running_server: RunningServer,
) -> None:
    async with (
        running_server(max_message_bytes=1024) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        billing = billing_pb2_grpc.BillingServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await billing.ReserveCredit(reserve_request(user_id="x" * 2000), timeout=WAIT_S)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await row_count(app) == 0
        await billing.ReserveCredit(reserve_request(), timeout=WAIT_S)


def test_server_options_carry_the_limits_and_keepalive_settings() -> None:
    settings = Settings(
        max_message_bytes=2048,
        keepalive_time_s=30,
        keepalive_timeout_s=5,
        keepalive_min_client_interval_s=15,
        max_connection_age_s=600,
        shutdown_grace_s=12,
    )
    options = dict(server_options(settings))
    assert options["grpc.max_receive_message_length"] == 2048
    assert options["grpc.max_send_message_length"] == 2048
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == 5_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 15_000
    assert options["grpc.max_connection_age_ms"] == 600_000
    assert options["grpc.max_connection_age_grace_ms"] == 12_000
    assert options["grpc.so_reuseport"] == 0
    assert "grpc.max_connection_age_ms" not in dict(server_options(Settings()))


async def test_a_client_pinging_within_the_allowed_interval_keeps_its_connection(
    running_server: RunningServer,
) -> None:
    client_options = [
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    async with (
        running_server() as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=client_options) as channel,
    ):
        billing = billing_pb2_grpc.BillingServiceStub(channel)
        for _ in range(3):
            await billing.CheckAccess(
                billing_pb2.CheckAccessRequest(tenant_id="acme", model="unit-priced"),
                timeout=WAIT_S,
            )


async def test_a_second_server_cannot_take_a_port_in_use(running_server: RunningServer) -> None:
    async with running_server() as first:
        address = f"127.0.0.1:{first.port}"
        with pytest.raises(Exception, match=f"cannot listen on {address}: Address already in use"):
            async with running_server(listen_address=address):
                pass


@pytest.mark.parametrize(
    ("address", "authenticated", "warns"),
    [
        ("127.0.0.1:50051", False, False),
        ("localhost:50051", False, False),
        ("[::1]:50051", False, False),
        ("0.0.0.0:50051", False, True),
        ("[::]:50051", False, True),
        ("10.1.2.3:50051", False, True),
        ("billing.internal:50051", False, True),
        ("0.0.0.0:50051", True, False),
    ],
)
def test_serving_unauthenticated_beyond_loopback_is_warned_about(
    address: str, authenticated: bool, warns: bool
) -> None:
    assert (exposure_warning(address, authenticated) is not None) is warns


async def test_the_server_logs_the_exposure_warning(
    running_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="billing_service.app")
    async with running_server(listen_address="0.0.0.0:0"):
        pass
    assert any("SERVING WITHOUT AUTHENTICATION" in r.getMessage() for r in caplog.records)
    caplog.clear()
    async with running_server(
        listen_address="0.0.0.0:0", auth_tokens="operator=0123456789abcdef0123"
    ):
        pass
    assert not any("WITHOUT AUTHENTICATION" in r.getMessage() for r in caplog.records)


async def test_refused_calls_are_counted_with_their_code(running_server: RunningServer) -> None:
    async with (
        running_server(auth_tokens="operator=0123456789abcdef0123") as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await billing_pb2_grpc.BillingServiceStub(channel).ReserveCredit(reserve_request())
        assert rich_error(refused.value).reason == "CREDENTIALS_MISSING"
        count = app.metrics.registry.get_sample_value(
            "grpc_server_handled_total",
            {
                "grpc_service": "billing.v1.BillingService",
                "grpc_method": "ReserveCredit",
                "grpc_code": "UNAUTHENTICATED",
            },
        )
        assert count == 1
