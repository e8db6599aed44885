"""AdminService.ListOpenHolds: one tenant's open holds, oldest first, filtered and paginated."""

from __future__ import annotations

import grpc
import pytest

from billing.v1 import admin_pb2, billing_pb2, types_pb2
from tests.api.conftest import Client
from tests.api.test_rpcs import create_tenant, reserve, rid
from tests.support.grpc_errors import rich_error


async def _all_pages(client: Client, **filters: str) -> list[admin_pb2.OpenHold]:
    found: list[admin_pb2.OpenHold] = []
    token = ""
    while True:
        page = await client.admin.ListOpenHolds(
            admin_pb2.ListOpenHoldsRequest(page_size=2, page_token=token, **filters)
        )
        assert len(page.holds) <= 2
        found.extend(page.holds)
        token = page.next_page_token
        if not token:
            return found


async def test_open_holds_are_listed_oldest_first_with_who_took_them(client: Client) -> None:
    await create_tenant(client, "acme")
    await create_tenant(client, "globex")
    taken = []
    for number in range(5):
        response = await reserve(
            client,
            "acme",
            user_id="ann" if number % 2 else "bob",
            api_key_id="key-1" if number < 3 else "key-2",
            amount_micros=10_000 + number,
        )
        taken.append(response.reservation)
        client.clock.advance(seconds=1)
    await reserve(client, "globex", amount_micros=1_000)
    # A committed and a released hold are no longer open.
    await client.billing.Commit(
        billing_pb2.CommitRequest(
            request_id=rid(),
            reservation_id=taken[0].reservation_id,
            usage=types_pb2.TokenUsage(input_tokens=100, output_tokens=10),
        )
    )
    await client.billing.Release(
        billing_pb2.ReleaseRequest(request_id=rid(), reservation_id=taken[1].reservation_id)
    )

    listed = await _all_pages(client, tenant_id="acme")

    assert [hold.hold_id for hold in listed] == [hold.reservation_id for hold in taken[2:]]
    assert [hold.amount_micros for hold in listed] == [10_002, 10_003, 10_004]
    assert [(hold.user_id, hold.api_key_id) for hold in listed] == [
        ("bob", "key-1"),
        ("ann", "key-2"),
        ("bob", "key-2"),
    ]
    assert all(hold.model == "gpt-4o" for hold in listed)
    assert [hold.create_time.seconds for hold in listed] == sorted(
        hold.create_time.seconds for hold in listed
    )
    assert all(hold.expire_time.seconds > hold.create_time.seconds for hold in listed)
    assert (
        sum(hold.amount_micros for hold in listed)
        == (
            await client.admin.GetTenant(admin_pb2.GetTenantRequest(tenant_id="acme"))
        ).tenant.balance.held_micros
    )

    by_user = await _all_pages(client, tenant_id="acme", user_id="bob")
    assert [hold.amount_micros for hold in by_user] == [10_002, 10_004]
    by_key = await _all_pages(client, tenant_id="acme", api_key_id="key-2")
    assert [hold.amount_micros for hold in by_key] == [10_003, 10_004]
    both = await _all_pages(client, tenant_id="acme", user_id="ann", api_key_id="key-2")
    assert [hold.amount_micros for hold in both] == [10_003]
    assert await _all_pages(client, tenant_id="nobody") == []


async def test_a_page_token_is_bound_to_its_filters(client: Client) -> None:
    await create_tenant(client, "acme")
    for _ in range(2):
        await reserve(client, "acme", amount_micros=1_000)
        client.clock.advance(seconds=1)
    first = await client.admin.ListOpenHolds(
        admin_pb2.ListOpenHoldsRequest(tenant_id="acme", page_size=1)
    )
    assert first.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.admin.ListOpenHolds(
            admin_pb2.ListOpenHoldsRequest(
                tenant_id="acme", user_id="ann", page_size=1, page_token=first.next_page_token
            )
        )
    error = rich_error(raised.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.fields == ["page_token"]


@pytest.mark.parametrize(
    ("request_message", "field"),
    [
        (admin_pb2.ListOpenHoldsRequest(), "tenant_id"),
        (admin_pb2.ListOpenHoldsRequest(tenant_id="x" * 129), "tenant_id"),
        (admin_pb2.ListOpenHoldsRequest(tenant_id="acme", user_id="x" * 129), "user_id"),
        (admin_pb2.ListOpenHoldsRequest(tenant_id="acme", api_key_id="a\nb"), "api_key_id"),
        (admin_pb2.ListOpenHoldsRequest(tenant_id="acme", page_size=-1), "page_size"),
        (admin_pb2.ListOpenHoldsRequest(tenant_id="acme", page_size=1001), "page_size"),
        (admin_pb2.ListOpenHoldsRequest(tenant_id="acme", page_token="junk"), "page_token"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    client: Client, request_message: admin_pb2.ListOpenHoldsRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.admin.ListOpenHolds(request_message)
    error = rich_error(raised.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.fields == [field]
