"""ExtendHold over gRPC: a hold that grows while its answer streams, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, timedelta

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from billing.v1 import admin_pb2, billing_pb2, types_pb2, usage_pb2, usage_pb2_grpc
from billing_service.storage.audit import audit_ledger
from tests.api.conftest import Client
from tests.api.test_bad_input import refused
from tests.api.test_rpcs import balance, create_tenant, reserve, rid
from tests.support.grpc_errors import rich_error

# gpt-4o: $2.50 input and $10 output per million tokens. 1,000 input tokens and a first chunk
# of 200 output tokens hold 2,500 + 2,000.
FIRST_HOLD = 4_500


def extend(
    reservation_id: str, tokens: int, output_so_far: int = 0, **fields: object
) -> billing_pb2.ExtendHoldRequest:
    return billing_pb2.ExtendHoldRequest(
        request_id=str(fields.pop("request_id", rid())),
        reservation_id=reservation_id,
        additional_output_tokens=tokens,
        usage=types_pb2.TokenUsage(input_tokens=1_000, output_tokens=output_so_far),
        **fields,  # type: ignore[arg-type]
    )


async def test_a_stream_grows_its_hold_then_commits_its_real_counts(client: Client) -> None:
    await create_tenant(client, "acme")
    reserved = await reserve(
        client,
        "acme",
        estimate=billing_pb2.QueryEstimate(input_tokens=1_000, max_output_tokens=200),
    )
    hold = reserved.reservation
    assert hold.amount_micros == FIRST_HOLD
    client.clock.advance(seconds=280)  # 20 s before its expire time

    request = extend(hold.reservation_id, 1_000, output_so_far=150, ttl=Duration(seconds=60))
    grown = await client.billing.ExtendHold(request)

    assert grown.decision.allowed
    assert grown.decision.model_billing == types_pb2.MODEL_BILLING_METERED
    assert grown.decision.required_micros == grown.extended_micros == 10_000
    assert grown.reservation.amount_micros == FIRST_HOLD + 10_000
    assert grown.reservation.status == types_pb2.RESERVATION_STATUS_OPEN
    expire_time = grown.reservation.expire_time.ToDatetime(tzinfo=UTC)
    assert expire_time == client.clock.now + timedelta(seconds=60)
    # 14,500 held, 2,500 + 1,500 spent: 10,500 left, 1,050 more output tokens.
    assert grown.covered_output_tokens == 1_050
    assert (await balance(client, "acme")).held_micros == FIRST_HOLD + 10_000
    assert await client.billing.ExtendHold(request) == grown

    committed = await client.billing.Commit(
        billing_pb2.CommitRequest(
            request_id=rid(),
            reservation_id=hold.reservation_id,
            usage=types_pb2.TokenUsage(input_tokens=1_000, output_tokens=1_100),
        )
    )
    assert committed.usage_record.charged_micros == 2_500 + 11_000
    assert committed.usage_record.held_micros == FIRST_HOLD + 10_000
    assert committed.usage_record.uncollected_micros == 0
    assert await audit_ledger(client.app.engine) == []

    # The statement shows the extension as its own kind of entry, and filters by it.
    usage = usage_pb2_grpc.UsageServiceStub(client.channel)
    page = await usage.ListLedgerEntries(
        usage_pb2.ListLedgerEntriesRequest(tenant_id="acme", page_size=10)
    )
    assert sorted((e.kind, e.held_delta_micros) for e in page.ledger_entries) == [
        (usage_pb2.LEDGER_ENTRY_KIND_HOLD, FIRST_HOLD),
        (usage_pb2.LEDGER_ENTRY_KIND_DEBIT, -(FIRST_HOLD + 10_000)),
        (usage_pb2.LEDGER_ENTRY_KIND_EXTENSION, 10_000),
    ]
    extensions = await usage.ListLedgerEntries(
        usage_pb2.ListLedgerEntriesRequest(
            tenant_id="acme", kinds=[usage_pb2.LEDGER_ENTRY_KIND_EXTENSION]
        )
    )
    assert [e.reservation_id for e in extensions.ledger_entries] == [hold.reservation_id]


async def test_a_denied_extension_is_an_answer_that_says_where_to_stop(client: Client) -> None:
    await client.admin.CreateTenant(
        admin_pb2.CreateTenantRequest(
            request_id=rid(),
            tenant_id="acme",
            payment_method_on_file=True,
            credit_limit_micros=FIRST_HOLD + 9_999,
        )
    )
    hold = (
        await reserve(
            client,
            "acme",
            estimate=billing_pb2.QueryEstimate(input_tokens=1_000, max_output_tokens=200),
        )
    ).reservation
    denied = await client.billing.ExtendHold(extend(hold.reservation_id, 1_000, output_so_far=150))
    assert not denied.decision.allowed
    assert denied.decision.reason == types_pb2.DENIAL_REASON_CREDIT_LIMIT_REACHED
    assert denied.decision.available_credit_micros == 9_999
    assert denied.extended_micros == 0
    assert denied.reservation.amount_micros == FIRST_HOLD
    assert denied.reservation.expire_time == hold.expire_time
    assert denied.covered_output_tokens == 50
    assert (await balance(client, "acme")).held_micros == FIRST_HOLD


async def test_a_settled_hold_does_not_grow(client: Client) -> None:
    await create_tenant(client, "acme")
    hold = (await reserve(client, "acme", amount_micros=10_000)).reservation
    await client.billing.Release(
        billing_pb2.ReleaseRequest(request_id=rid(), reservation_id=hold.reservation_id)
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.billing.ExtendHold(extend(hold.reservation_id, 10))
    error = rich_error(raised.value)
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "HOLD_RELEASED")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.billing.ExtendHold(extend("rsv_" + "0" * 32, 10))
    assert rich_error(raised.value).reason == "RESERVATION_NOT_FOUND"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"request_id": ""}, "request_id"),
        ({"reservation_id": "rsv_x"}, "reservation_id"),
        ({"additional_output_tokens": 0}, "additional_output_tokens"),
        ({"additional_output_tokens": 100_000_001}, "additional_output_tokens"),
        ({"usage": types_pb2.TokenUsage(output_tokens=-1)}, "usage.output_tokens"),
        ({"ttl": Duration(seconds=0)}, "ttl"),
        ({"ttl": Duration(seconds=-5)}, "ttl"),
        ({"ttl": Duration(seconds=10, nanos=2_000_000_000)}, "ttl"),
    ],
    ids=str,
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    client: Client, fields: dict[str, object], field: str
) -> None:
    await create_tenant(client, "acme")
    hold = (await reserve(client, "acme", amount_micros=10_000)).reservation
    request = billing_pb2.ExtendHoldRequest(
        request_id=rid(), reservation_id=hold.reservation_id, additional_output_tokens=10
    )
    for name, value in fields.items():
        if isinstance(value, types_pb2.TokenUsage | Duration):
            getattr(request, name).CopyFrom(value)
        else:
            setattr(request, name, value)
    await refused(client, client.billing.ExtendHold(request), field)
