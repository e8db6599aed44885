"""BillingService and AdminService over a real gRPC port: answers, balances and error codes."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from sqlalchemy import func, select

from billing.v1 import admin_pb2, billing_pb2, types_pb2
from billing_service.storage.audit import audit_ledger
from billing_service.storage.tables import holds, ledger_entries, tenants, usage_records
from tests.api.conftest import Client
from tests.support.grpc_errors import rich_error

LIMIT = 25_000_000
# gpt-4o in the shipped price table: $2.50 input, $1.25 cached input, $10 output per 1M tokens.
GPT_4O_HOLD_1200_IN_800_OUT = 1200 * 2_500_000 // 1_000_000 + 800 * 10_000_000 // 1_000_000


def rid() -> str:
    return str(uuid.uuid4())


async def create_tenant(client: Client, tenant_id: str, *, card: bool = True) -> None:
    await client.admin.CreateTenant(
        admin_pb2.CreateTenantRequest(
            request_id=rid(), tenant_id=tenant_id, payment_method_on_file=card
        )
    )


async def balance(client: Client, tenant_id: str) -> admin_pb2.Balance:
    response = await client.admin.GetTenant(admin_pb2.GetTenantRequest(tenant_id=tenant_id))
    return response.tenant.balance


async def reserve(client: Client, tenant_id: str, **size: Any) -> billing_pb2.ReserveCreditResponse:
    request = billing_pb2.ReserveCreditRequest(
        request_id=size.pop("request_id", rid()),
        tenant_id=tenant_id,
        user_id=size.pop("user_id", "user-1"),
        model=size.pop("model", "gpt-4o"),
        **size,
    )
    response: billing_pb2.ReserveCreditResponse = await client.billing.ReserveCredit(request)
    return response


async def row_counts(client: Client) -> dict[str, int]:
    counts = {}
    async with client.app.engine.connect() as conn:
        for table in (tenants, holds, ledger_entries, usage_records):
            counts[table.name] = (
                await conn.execute(select(func.count()).select_from(table))
            ).scalar_one()
    return counts


async def test_reserve_commit_refund_moves_exactly_the_priced_amounts(client: Client) -> None:
    await create_tenant(client, "acme")

    reserved = await reserve(
        client,
        "acme",
        estimate=billing_pb2.QueryEstimate(input_tokens=1200, max_output_tokens=800),
    )
    assert reserved.decision.allowed
    assert reserved.decision.model_billing == types_pb2.MODEL_BILLING_METERED
    hold = reserved.reservation
    assert hold.amount_micros == GPT_4O_HOLD_1200_IN_800_OUT == 11_000
    assert hold.status == types_pb2.RESERVATION_STATUS_OPEN
    assert reserved.decision.available_credit_micros == LIMIT - 11_000
    assert (await balance(client, "acme")).held_micros == 11_000

    committed = await client.billing.Commit(
        billing_pb2.CommitRequest(
            request_id=rid(),
            reservation_id=hold.reservation_id,
            usage=types_pb2.TokenUsage(
                input_tokens=1000, cached_input_tokens=200, output_tokens=500
            ),
        )
    )
    record = committed.usage_record
    assert record.cost_micros == 2_500 + 250 + 5_000
    assert record.charged_micros == 7_750
    assert record.uncollected_micros == 0
    assert record.held_micros == 11_000
    assert record.payment_source == types_pb2.PAYMENT_SOURCE_CREDIT
    assert committed.available_credit_micros == LIMIT - 7_750
    after_commit = await balance(client, "acme")
    assert (after_commit.balance_micros, after_commit.held_micros) == (-7_750, 0)
    assert after_commit.exposure_micros == 7_750

    partial = await client.billing.Refund(
        billing_pb2.RefundRequest(
            request_id=rid(), reservation_id=hold.reservation_id, amount_micros=1_000
        )
    )
    assert partial.kind == billing_pb2.REFUND_KIND_REFUND
    assert (partial.amount_micros, partial.refunded_total_micros) == (1_000, 1_000)
    rest = await client.billing.Refund(
        billing_pb2.RefundRequest(
            request_id=rid(), reservation_id=hold.reservation_id, refund_all=True
        )
    )
    assert (rest.amount_micros, rest.refunded_total_micros) == (6_750, 7_750)
    assert rest.available_credit_micros == LIMIT
    assert (await balance(client, "acme")).balance_micros == 0
    assert await audit_ledger(client.app.engine) == []


async def test_release_gives_the_whole_hold_back(client: Client) -> None:
    await create_tenant(client, "acme")
    hold = (await reserve(client, "acme", amount_micros=2_000_000)).reservation
    request = billing_pb2.ReleaseRequest(
        request_id=rid(), reservation_id=hold.reservation_id, reason="model timed out"
    )
    released = await client.billing.Release(request)
    assert released == billing_pb2.ReleaseResponse(
        released_micros=2_000_000, available_credit_micros=LIMIT
    )
    assert (await balance(client, "acme")).held_micros == 0
    counts = await row_counts(client)
    assert await client.billing.Release(request) == released
    request.reason = "another reason"
    await _expect_error(
        client.billing.Release(request), grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED"
    )
    assert await row_counts(client) == counts


async def test_a_refund_without_an_amount_is_a_release(client: Client) -> None:
    """The shape earlier clients sent to release: it releases an open hold, and refunds
    nothing of a committed one."""
    await create_tenant(client, "acme")
    hold = (await reserve(client, "acme", amount_micros=2_000_000)).reservation
    released = await client.billing.Refund(
        billing_pb2.RefundRequest(request_id=rid(), reservation_id=hold.reservation_id)
    )
    assert released.kind == billing_pb2.REFUND_KIND_RELEASE
    assert released.amount_micros == 2_000_000
    assert released.available_credit_micros == LIMIT

    committed = (await reserve(client, "acme", amount_micros=20_000)).reservation
    await client.billing.Commit(
        billing_pb2.CommitRequest(
            request_id=rid(),
            reservation_id=committed.reservation_id,
            usage=types_pb2.TokenUsage(output_tokens=3_000),
        )
    )
    counts = await row_counts(client)
    for release in (
        client.billing.Refund(
            billing_pb2.RefundRequest(request_id=rid(), reservation_id=committed.reservation_id)
        ),
        client.billing.Release(
            billing_pb2.ReleaseRequest(request_id=rid(), reservation_id=committed.reservation_id)
        ),
    ):
        await _expect_error(release, grpc.StatusCode.FAILED_PRECONDITION, "HOLD_ALREADY_COMMITTED")
    assert await row_counts(client) == counts
    assert (await balance(client, "acme")).balance_micros == -30_000
    assert await audit_ledger(client.app.engine) == []


async def test_a_release_after_the_expire_time_is_an_expiry(client: Client) -> None:
    await create_tenant(client, "acme")
    hold = (
        await reserve(client, "acme", amount_micros=3_000, ttl=Duration(seconds=60))
    ).reservation
    client.clock.advance(seconds=60)
    await _expect_error(
        client.billing.Release(
            billing_pb2.ReleaseRequest(request_id=rid(), reservation_id=hold.reservation_id)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "HOLD_EXPIRED",
    )
    after = await balance(client, "acme")
    assert (after.held_micros, after.available_credit_micros) == (0, LIMIT)
    async with client.app.engine.connect() as conn:
        kinds = (
            await conn.execute(
                select(ledger_entries.c.kind)
                .where(ledger_entries.c.hold_id == hold.reservation_id)
                .order_by(ledger_entries.c.entry_id)
            )
        ).scalars()
        assert list(kinds) == ["hold", "expiry"]
    assert await audit_ledger(client.app.engine) == []


async def test_commit_above_the_hold_charges_only_up_to_the_cap(client: Client) -> None:
    await create_tenant(client, "acme")
    big = (await reserve(client, "acme", amount_micros=LIMIT - 1_000)).reservation
    await reserve(client, "acme", amount_micros=1_000)  # fills the cap exactly

    committed = await client.billing.Commit(
        billing_pb2.CommitRequest(
            request_id=rid(),
            reservation_id=big.reservation_id,
            usage=types_pb2.TokenUsage(output_tokens=10_000_000),  # $100 of gpt-4o output
        )
    )
    record = committed.usage_record
    assert record.cost_micros == 100_000_000
    assert record.charged_micros == LIMIT - 1_000
    assert record.uncollected_micros == 100_000_000 - (LIMIT - 1_000)
    now = await balance(client, "acme")
    assert (now.balance_micros, now.held_micros, now.available_credit_micros) == (
        -(LIMIT - 1_000),
        1_000,
        0,
    )
    assert now.exposure_micros == LIMIT
    assert await audit_ledger(client.app.engine) == []


async def test_included_model_is_recorded_at_its_price_and_charges_nothing(client: Client) -> None:
    reserved = await reserve(
        client,
        "newcomer",
        model="gpt-4o-mini",
        estimate=billing_pb2.QueryEstimate(input_tokens=100, max_output_tokens=100),
    )
    assert reserved.decision.allowed
    assert reserved.decision.model_billing == types_pb2.MODEL_BILLING_INCLUDED
    assert reserved.reservation.amount_micros == 0
    committed = await client.billing.Commit(
        billing_pb2.CommitRequest(
            request_id=rid(),
            reservation_id=reserved.reservation.reservation_id,
            usage=types_pb2.TokenUsage(input_tokens=1_000_000, output_tokens=1_000_000),
        )
    )
    assert committed.usage_record.cost_micros == 150_000 + 600_000
    assert committed.usage_record.charged_micros == 0
    assert committed.usage_record.payment_source == types_pb2.PAYMENT_SOURCE_INCLUDED
    assert (await balance(client, "newcomer")).balance_micros == 0


@pytest.mark.parametrize(
    ("setup", "model", "amount", "reason"),
    [
        ("none", "gpt-4o", 1_000, types_pb2.DENIAL_REASON_PAYMENT_METHOD_REQUIRED),
        ("card", "gpt-4o", LIMIT + 1, types_pb2.DENIAL_REASON_CREDIT_LIMIT_REACHED),
        ("suspended", "gpt-4o-mini", 1, types_pb2.DENIAL_REASON_ACCOUNT_SUSPENDED),
        ("card", "no-such-model", 1, types_pb2.DENIAL_REASON_MODEL_NOT_OFFERED),
    ],
)
async def test_denials_are_answers_with_a_reason_not_errors(
    client: Client, setup: str, model: str, amount: int, reason: int
) -> None:
    if setup != "none":
        await create_tenant(client, "acme")
    if setup == "suspended":
        await client.admin.UpdateTenant(
            admin_pb2.UpdateTenantRequest(
                request_id=rid(), tenant_id="acme", status=admin_pb2.TENANT_STATUS_SUSPENDED
            )
        )
    checked = await client.billing.CheckAccess(
        billing_pb2.CheckAccessRequest(tenant_id="acme", model=model)
    )
    reserved = await reserve(client, "acme", model=model, amount_micros=amount)
    for decision in (reserved.decision,) + ((checked.decision,) if amount == 1 else ()):
        assert not decision.allowed
        assert decision.reason == reason
        assert decision.message
    assert not reserved.HasField("reservation")
    assert (await balance(client, "acme")).held_micros == 0


async def test_a_tenant_with_prepaid_credit_and_no_card_may_spend_the_credit(
    client: Client,
) -> None:
    await create_tenant(client, "acme", card=False)
    await client.admin.GrantCredit(
        admin_pb2.GrantCreditRequest(
            request_id=rid(), tenant_id="acme", amount_micros=5_000, reason="trial"
        )
    )
    assert (await reserve(client, "acme", amount_micros=5_000)).decision.allowed
    denied = await reserve(client, "acme", amount_micros=1)
    assert denied.decision.reason == types_pb2.DENIAL_REASON_PAYMENT_METHOD_REQUIRED
    assert denied.decision.available_credit_micros == 0


def _reserve_request(**overrides: Any) -> billing_pb2.ReserveCreditRequest:
    fields: dict[str, Any] = {
        "request_id": "req-1",
        "tenant_id": "acme",
        "user_id": "user-1",
        "model": "gpt-4o",
        "amount_micros": 1_000,
    }
    fields.update(overrides)
    return billing_pb2.ReserveCreditRequest(**{k: v for k, v in fields.items() if v is not None})


_VALID_ID = "rsv_" + "0" * 32


@pytest.mark.parametrize(
    ("method", "request_message", "field"),
    [
        ("ReserveCredit", _reserve_request(tenant_id=""), "tenant_id"),
        ("ReserveCredit", _reserve_request(tenant_id="t" * 129), "tenant_id"),
        ("ReserveCredit", _reserve_request(tenant_id="has space"), "tenant_id"),
        ("ReserveCredit", _reserve_request(user_id=""), "user_id"),
        ("ReserveCredit", _reserve_request(request_id=""), "request_id"),
        ("ReserveCredit", _reserve_request(model=""), "model"),
        ("ReserveCredit", _reserve_request(amount_micros=0), "amount_micros"),
        ("ReserveCredit", _reserve_request(amount_micros=None), "size"),
        ("ReserveCredit", _reserve_request(amount_micros=-5), "amount_micros"),
        ("ReserveCredit", _reserve_request(amount_micros=10**13), "amount_micros"),
        (
            "ReserveCredit",
            _reserve_request(
                amount_micros=None,
                estimate=billing_pb2.QueryEstimate(input_tokens=-1, max_output_tokens=10),
            ),
            "estimate.input_tokens",
        ),
        (
            "ReserveCredit",
            _reserve_request(
                amount_micros=None,
                estimate=billing_pb2.QueryEstimate(input_tokens=1, max_output_tokens=0),
            ),
            "estimate.max_output_tokens",
        ),
        (
            "ReserveCredit",
            _reserve_request(
                amount_micros=None,
                estimate=billing_pb2.QueryEstimate(input_tokens=2**62, max_output_tokens=1),
            ),
            "estimate.input_tokens",
        ),
        ("ReserveCredit", _reserve_request(ttl=Duration(seconds=0)), "ttl"),
        ("ReserveCredit", _reserve_request(ttl=Duration(seconds=7200)), "ttl"),
        (
            "Commit",
            billing_pb2.CommitRequest(request_id="c", reservation_id="rsv_nope"),
            "reservation_id",
        ),
        (
            "Commit",
            billing_pb2.CommitRequest(
                request_id="c",
                reservation_id=_VALID_ID,
                usage=types_pb2.TokenUsage(output_tokens=-1),
            ),
            "usage.output_tokens",
        ),
        (
            "Commit",
            billing_pb2.CommitRequest(
                request_id="c",
                reservation_id=_VALID_ID,
                usage=types_pb2.TokenUsage(input_tokens=2**63 - 1),
            ),
            "usage.input_tokens",
        ),
        (
            "Refund",
            billing_pb2.RefundRequest(request_id="f", reservation_id=_VALID_ID, amount_micros=-1),
            "amount_micros",
        ),
        (
            "Refund",
            billing_pb2.RefundRequest(request_id="", reservation_id=_VALID_ID),
            "request_id",
        ),
        (
            "Refund",
            billing_pb2.RefundRequest(
                request_id="f", reservation_id=_VALID_ID, amount_micros=5, refund_all=True
            ),
            "amount_micros",
        ),
        (
            "Release",
            billing_pb2.ReleaseRequest(request_id="", reservation_id=_VALID_ID),
            "request_id",
        ),
        (
            "Release",
            billing_pb2.ReleaseRequest(request_id="l", reservation_id="rsv_1"),
            "reservation_id",
        ),
        (
            "Release",
            billing_pb2.ReleaseRequest(request_id="l", reservation_id=_VALID_ID, reason="x" * 501),
            "reason",
        ),
        (
            "CheckAccess",
            billing_pb2.CheckAccessRequest(tenant_id="x" * 200, model="m"),
            "tenant_id",
        ),
        (
            "GrantCredit",
            admin_pb2.GrantCreditRequest(request_id="g", tenant_id="acme", reason="r"),
            "amount_micros",
        ),
        (
            "GrantCredit",
            admin_pb2.GrantCreditRequest(request_id="g", tenant_id="acme", amount_micros=5),
            "reason",
        ),
        (
            "CreateTenant",
            admin_pb2.CreateTenantRequest(request_id="n", tenant_id="b", credit_limit_micros=-1),
            "credit_limit_micros",
        ),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field_and_changes_nothing(
    client: Client, method: str, request_message: Any, field: str
) -> None:
    await create_tenant(client, "acme")
    before = await row_counts(client)
    stub = client.admin if method in ("GrantCredit", "CreateTenant") else client.billing
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await getattr(stub, method)(request_message)
    error = rich_error(raised.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.reason, error.domain) == ("FIELD_INVALID", "ai-billing")
    assert error.fields == [field]
    assert error.metadata == {"field": field}
    assert error.message.startswith(f"{field}:")
    assert await row_counts(client) == before


async def _expect_error(call: Any, code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    error = rich_error(raised.value)
    assert (error.code, error.reason) == (code, reason), error.message


async def test_not_found_errors(client: Client) -> None:
    await _expect_error(
        client.billing.Commit(
            billing_pb2.CommitRequest(request_id=rid(), reservation_id=_VALID_ID)
        ),
        grpc.StatusCode.NOT_FOUND,
        "RESERVATION_NOT_FOUND",
    )
    await _expect_error(
        client.billing.Refund(
            billing_pb2.RefundRequest(request_id=rid(), reservation_id=_VALID_ID)
        ),
        grpc.StatusCode.NOT_FOUND,
        "RESERVATION_NOT_FOUND",
    )
    await _expect_error(
        client.billing.Release(
            billing_pb2.ReleaseRequest(request_id=rid(), reservation_id=_VALID_ID)
        ),
        grpc.StatusCode.NOT_FOUND,
        "RESERVATION_NOT_FOUND",
    )
    await _expect_error(
        client.admin.GetTenant(admin_pb2.GetTenantRequest(tenant_id="ghost")),
        grpc.StatusCode.NOT_FOUND,
        "TENANT_NOT_FOUND",
    )
    await _expect_error(
        client.admin.GrantCredit(
            admin_pb2.GrantCreditRequest(
                request_id=rid(), tenant_id="ghost", amount_micros=1, reason="r"
            )
        ),
        grpc.StatusCode.NOT_FOUND,
        "TENANT_NOT_FOUND",
    )


async def test_failed_preconditions_carry_stable_reasons(client: Client) -> None:
    await create_tenant(client, "acme")
    released = (await reserve(client, "acme", amount_micros=1_000)).reservation.reservation_id
    await client.billing.Release(
        billing_pb2.ReleaseRequest(request_id=rid(), reservation_id=released)
    )
    usage = types_pb2.TokenUsage(output_tokens=10)
    failed = grpc.StatusCode.FAILED_PRECONDITION
    await _expect_error(
        client.billing.Commit(
            billing_pb2.CommitRequest(request_id=rid(), reservation_id=released, usage=usage)
        ),
        failed,
        "HOLD_RELEASED",
    )
    await _expect_error(
        client.billing.Refund(billing_pb2.RefundRequest(request_id=rid(), reservation_id=released)),
        failed,
        "HOLD_RELEASED",
    )

    held = (await reserve(client, "acme", amount_micros=1_000)).reservation.reservation_id
    await _expect_error(
        client.billing.Refund(
            billing_pb2.RefundRequest(request_id=rid(), reservation_id=held, amount_micros=5)
        ),
        failed,
        "PARTIAL_RELEASE_NOT_ALLOWED",
    )
    await _expect_error(
        client.billing.Refund(
            billing_pb2.RefundRequest(request_id=rid(), reservation_id=held, refund_all=True)
        ),
        failed,
        "HOLD_NOT_COMMITTED",
    )
    await _expect_error(
        client.billing.Release(
            billing_pb2.ReleaseRequest(request_id=rid(), reservation_id=released)
        ),
        failed,
        "HOLD_RELEASED",
    )
    await client.billing.Commit(
        billing_pb2.CommitRequest(request_id=rid(), reservation_id=held, usage=usage)
    )
    await _expect_error(
        client.billing.Commit(
            billing_pb2.CommitRequest(request_id=rid(), reservation_id=held, usage=usage)
        ),
        failed,
        "HOLD_ALREADY_COMMITTED",
    )
    await _expect_error(
        client.billing.Release(billing_pb2.ReleaseRequest(request_id=rid(), reservation_id=held)),
        failed,
        "HOLD_ALREADY_COMMITTED",
    )
    await _expect_error(
        client.billing.Refund(
            billing_pb2.RefundRequest(request_id=rid(), reservation_id=held, amount_micros=101)
        ),
        failed,
        "REFUND_EXCEEDS_CHARGE",
    )
    assert await audit_ledger(client.app.engine) == []


async def test_an_expired_hold_cannot_be_committed_and_is_released(client: Client) -> None:
    await create_tenant(client, "acme")
    hold = (
        await reserve(client, "acme", amount_micros=3_000, ttl=Duration(seconds=60))
    ).reservation
    client.clock.advance(seconds=61)
    await _expect_error(
        client.billing.Commit(
            billing_pb2.CommitRequest(
                request_id=rid(),
                reservation_id=hold.reservation_id,
                usage=types_pb2.TokenUsage(output_tokens=1),
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "HOLD_EXPIRED",
    )
    assert await client.app.core.release_expired() in (0, 1)  # the sweeper may have been first
    after = await balance(client, "acme")
    assert (after.held_micros, after.available_credit_micros) == (0, LIMIT)
    assert await audit_ledger(client.app.engine) == []


async def test_reused_request_id_with_other_content_is_already_exists(client: Client) -> None:
    await create_tenant(client, "acme")
    await reserve(client, "acme", request_id="same", amount_micros=1_000)
    await _expect_error(
        client.billing.ReserveCredit(_reserve_request(request_id="same", amount_micros=2_000)),
        grpc.StatusCode.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
    )
    await _expect_error(
        client.admin.CreateTenant(
            admin_pb2.CreateTenantRequest(request_id=rid(), tenant_id="acme")
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "TENANT_ALREADY_EXISTS",
    )


async def test_every_mutating_call_replays_its_first_answer(client: Client) -> None:
    create = admin_pb2.CreateTenantRequest(
        request_id=rid(), tenant_id="acme", payment_method_on_file=True
    )
    assert await client.admin.CreateTenant(create) == await client.admin.CreateTenant(create)
    update = admin_pb2.UpdateTenantRequest(
        request_id=rid(), tenant_id="acme", credit_limit_micros=30_000_000
    )
    assert await client.admin.UpdateTenant(update) == await client.admin.UpdateTenant(update)
    grant = admin_pb2.GrantCreditRequest(
        request_id=rid(), tenant_id="acme", amount_micros=1_000_000, reason="welcome"
    )
    assert await client.admin.GrantCredit(grant) == await client.admin.GrantCredit(grant)

    reserve_request = _reserve_request(request_id=rid(), amount_micros=4_000)
    first = await client.billing.ReserveCredit(reserve_request)
    assert await client.billing.ReserveCredit(reserve_request) == first
    commit = billing_pb2.CommitRequest(
        request_id=rid(),
        reservation_id=first.reservation.reservation_id,
        usage=types_pb2.TokenUsage(output_tokens=300),
    )
    committed = await client.billing.Commit(commit)
    assert await client.billing.Commit(commit) == committed
    refund = billing_pb2.RefundRequest(
        request_id=rid(), reservation_id=first.reservation.reservation_id, amount_micros=1_000
    )
    refunded = await client.billing.Refund(refund)
    counts = await row_counts(client)
    assert await client.billing.Refund(refund) == refunded
    assert await row_counts(client) == counts

    now = await balance(client, "acme")
    assert now.balance_micros == 1_000_000 - 3_000 + 1_000
    assert now.held_micros == 0
    assert await audit_ledger(client.app.engine) == []
