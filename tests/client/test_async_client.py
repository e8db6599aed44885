"""The asyncio client against a real server: the same promises as the blocking one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from billing.client import (
    AsyncBillingClient,
    BillingUnavailable,
    Denied,
    HoldExpired,
    HoldReleased,
    InvalidArgument,
    RetryEvent,
    Unauthenticated,
)
from billing.v1 import admin_pb2, billing_pb2
from tests.client.conftest import CHAT_TOKEN, LIMIT, OPERATOR_TOKEN, ServerThread, rid
from tests.support.ports import free_port


async def create_tenant(
    client: AsyncBillingClient, tenant_id: str, *, card: bool = True, limit: int = LIMIT
) -> None:
    await client.admin.CreateTenant(
        admin_pb2.CreateTenantRequest(
            request_id=rid(),
            tenant_id=tenant_id,
            payment_method_on_file=card,
            credit_limit_micros=limit,
        ),
        timeout=10,
    )


async def balance(client: AsyncBillingClient, tenant_id: str) -> admin_pb2.Balance:
    request = admin_pb2.GetTenantRequest(tenant_id=tenant_id)
    response = await client.admin.GetTenant(request, timeout=10)
    return response.tenant.balance


@pytest.fixture
async def billing(server: ServerThread) -> AsyncIterator[AsyncBillingClient]:
    async with AsyncBillingClient(server.address, timeout_s=10) as client:
        await create_tenant(client, "acme")
        yield client


async def test_check_reserve_commit_moves_exactly_the_priced_amounts(
    billing: AsyncBillingClient, server: ServerThread
) -> None:
    decision = await billing.check_access("acme", "unit-priced", input_tokens=100, max_tokens=50)
    assert (decision.allowed, decision.required_micros, decision.model_billing) == (
        True,
        150,
        "METERED",
    )
    async with billing.reserve(
        "acme", "user-1", "unit-priced", input_tokens=100, max_tokens=50
    ) as hold:
        assert hold.amount_micros == 150
        assert (await balance(billing, "acme")).held_micros == 150
        record = await hold.commit(input_tokens=100, output_tokens=20)
    assert (record.reservation_id, record.cost_micros, record.charged_micros) == (
        hold.reservation_id,
        120,
        120,
    )
    after = await balance(billing, "acme")
    assert (after.held_micros, after.available_credit_micros) == (0, LIMIT - 120)
    assert server.calls["Refund"] == 0


async def test_a_denial_raises_denied_before_the_block(
    billing: AsyncBillingClient, server: ServerThread
) -> None:
    await create_tenant(billing, "small", limit=100)
    entered = False
    with pytest.raises(Denied) as denied:
        async with billing.reserve("small", "u", "unit-priced", input_tokens=100, max_tokens=50):
            entered = True
    assert not entered
    assert denied.value.reason == "CREDIT_LIMIT_REACHED"
    assert denied.value.to_http()[0] == 402
    assert (await balance(billing, "small")).held_micros == 0
    assert server.calls["Refund"] == 0


async def test_an_exception_inside_the_block_releases_the_hold(
    billing: AsyncBillingClient,
) -> None:
    with pytest.raises(ValueError, match="model failed"):
        async with billing.reserve(
            "acme", "u", "unit-priced", input_tokens=100, max_tokens=50
        ) as hold:
            raise ValueError("model failed")
    assert hold.state == "released"
    after = await balance(billing, "acme")
    assert (after.held_micros, after.available_credit_micros) == (0, LIMIT)
    with pytest.raises(HoldReleased):
        await hold.commit(input_tokens=1, output_tokens=1)


async def test_a_cancelled_task_releases_its_hold(billing: AsyncBillingClient) -> None:
    holding = asyncio.Event()
    holds = []

    async def chat() -> None:
        async with billing.reserve(
            "acme", "u", "unit-priced", input_tokens=100, max_tokens=50
        ) as hold:
            holds.append(hold)
            holding.set()
            await asyncio.Event().wait()  # the model call that never ends

    task = asyncio.create_task(chat())
    await asyncio.wait_for(holding.wait(), timeout=30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert holds[0].state == "released"
    assert (await balance(billing, "acme")).held_micros == 0


async def test_leaving_without_commit_releases_or_commits_as_told(
    billing: AsyncBillingClient,
) -> None:
    async with billing.reserve("acme", "u", "unit-priced", input_tokens=100, max_tokens=50) as h:
        pass
    assert h.state == "released"
    assert (await balance(billing, "acme")).available_credit_micros == LIMIT

    async with billing.reserve(
        "acme", "u", "unit-priced", input_tokens=100, max_tokens=50, on_exit="commit"
    ) as h:
        pass
    assert h.state == "committed"
    assert h.record is not None
    assert h.record.charged_micros == h.amount_micros == 150
    after = await balance(billing, "acme")
    assert (after.held_micros, after.available_credit_micros) == (0, LIMIT - 150)


async def test_a_dropped_commit_response_is_retried_and_settles_once(
    billing: AsyncBillingClient, server: ServerThread
) -> None:
    retries: list[RetryEvent] = []
    async with AsyncBillingClient(server.address, timeout_s=10, on_retry=retries.append) as client:
        server.calls.drop_next_response("Commit")
        async with client.reserve(
            "acme", "u", "unit-priced", input_tokens=100, max_tokens=50
        ) as hold:
            record = await hold.commit(input_tokens=100, output_tokens=20)
        assert server.calls["Commit"] == 2
        assert [(r.method, r.code) for r in retries] == [("Commit", grpc.StatusCode.UNAVAILABLE)]
        assert record.charged_micros == 120
        assert await hold.commit(input_tokens=100, output_tokens=20) == record
    assert (await balance(billing, "acme")).available_credit_micros == LIMIT - 120


async def test_invalid_argument_is_not_retried(
    billing: AsyncBillingClient, server: ServerThread
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        async with billing.reserve("acme", "u", "unit-priced", input_tokens=1, max_tokens=0):
            pass
    assert [v.field for v in raised.value.field_violations] == ["estimate.max_output_tokens"]
    assert server.calls["ReserveCredit"] == 1


async def test_an_expired_hold_raises_hold_expired(
    billing: AsyncBillingClient, server: ServerThread
) -> None:
    async with billing.reserve(
        "acme", "u", "unit-priced", input_tokens=10, max_tokens=10, ttl_s=60
    ) as hold:
        server.clock.advance(seconds=61)
        with pytest.raises(HoldExpired):
            await hold.commit(input_tokens=10, output_tokens=10)
    assert hold.state == "expired"
    assert (server.calls["Release"], server.calls["Refund"]) == (0, 0)


async def test_refund_and_the_raw_stubs(billing: AsyncBillingClient) -> None:
    async with billing.reserve("acme", "u", "unit-priced", input_tokens=10, max_tokens=10) as h:
        await h.commit(input_tokens=10, output_tokens=10)
    refunded = await billing.refund(h.reservation_id, refund_all=True)
    assert (refunded.kind, refunded.amount_micros) == (billing_pb2.REFUND_KIND_REFUND, 20)
    assert (await balance(billing, "acme")).available_credit_micros == LIMIT


async def test_an_unreachable_server_is_retried_then_unavailable() -> None:
    retries: list[RetryEvent] = []
    address = f"127.0.0.1:{free_port()}"
    async with AsyncBillingClient(
        address, timeout_s=0.2, max_attempts=3, on_retry=retries.append
    ) as client:
        with pytest.raises(BillingUnavailable):
            await client.check_access("acme", "unit-priced")
    assert [r.attempt for r in retries] == [1, 2]


async def test_token_auth(token_server: ServerThread) -> None:
    async with AsyncBillingClient(token_server.address, token=OPERATOR_TOKEN) as operator:
        await create_tenant(operator, "acme")
    async with AsyncBillingClient(token_server.address, token=CHAT_TOKEN) as chat:
        async with chat.reserve("acme", "u", "unit-priced", input_tokens=1, max_tokens=1) as h:
            await h.commit(input_tokens=1, output_tokens=1)
        assert h.state == "committed"
    async with AsyncBillingClient(token_server.address) as anonymous:
        with pytest.raises(Unauthenticated) as raised:
            await anonymous.check_access("acme", "unit-priced")
        assert raised.value.reason == "CREDENTIALS_MISSING"
    assert token_server.calls["CheckAccess"] == 1
