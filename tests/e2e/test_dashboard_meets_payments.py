"""The usage dashboard of a tenant who pays by card: what the payments side knows (card,
status, auto top-up, the top-up and its PaymentIntent) next to the usage it paid for."""

from __future__ import annotations

from billing.v1 import account_pb2, billing_pb2, types_pb2, usage_pb2
from tests.e2e.conftest import METERED, Stack, serving
from tests.payments.conftest import CARD_OK, new_id
from tests.support.localstripe import LocalStripe


async def query(stack: Stack, tenant_id: str, user_id: str, output_tokens: int) -> None:
    reserved = await stack.billing.ReserveCredit(
        billing_pb2.ReserveCreditRequest(
            request_id=new_id("reserve"),
            tenant_id=tenant_id,
            user_id=user_id,
            model=METERED,
            estimate=billing_pb2.QueryEstimate(input_tokens=1_000, max_output_tokens=10_000),
        )
    )
    assert reserved.decision.allowed, reserved.decision
    await stack.billing.Commit(
        billing_pb2.CommitRequest(
            request_id=new_id("commit"),
            reservation_id=reserved.reservation.reservation_id,
            usage=types_pb2.TokenUsage(input_tokens=1_000, output_tokens=output_tokens),
        )
    )


async def test_the_dashboard_shows_the_card_the_top_up_and_its_payment_intent(
    database_url: str, localstripe: LocalStripe
) -> None:
    async with serving(database_url, localstripe.url, localstripe.url) as stack:
        tenant_id = await stack.create_tenant()
        saved = await stack.save_card(tenant_id, CARD_OK)
        charge = await stack.top_up_now(tenant_id, 10_000_000)
        assert charge.status == account_pb2.CHARGE_STATUS_SUCCEEDED
        for user_id, output_tokens in [("alice", 1_000), ("bob", 2_500), ("alice", 40)]:
            await query(stack, tenant_id, user_id, output_tokens)

        summary = await stack.usage.GetUsageSummary(
            usage_pb2.GetUsageSummaryRequest(tenant_id=tenant_id)
        )
        entries = await stack.usage.ListLedgerEntries(
            usage_pb2.ListLedgerEntriesRequest(
                tenant_id=tenant_id, kinds=[usage_pb2.LEDGER_ENTRY_KIND_TOP_UP]
            )
        )
        records = await stack.usage.ListUsageRecords(
            usage_pb2.ListUsageRecordsRequest(tenant_id=tenant_id, page_size=100)
        )

    shown = summary.billing_profile
    assert (shown.payment_method.brand, shown.payment_method.last4) == ("visa", "4242")
    assert shown.payment_method.payment_method_id == saved.payment_method.payment_method_id
    assert shown.billing_status == types_pb2.BILLING_STATUS_GOOD_STANDING
    assert shown.auto_top_up == saved.auto_top_up
    assert shown.auto_top_up.enabled
    assert summary.tenant.billing_status == types_pb2.BILLING_STATUS_GOOD_STANDING

    [top_up] = entries.ledger_entries
    assert top_up.balance_delta_micros == 10_000_000
    assert top_up.charge_id == charge.charge_id
    assert top_up.payment_intent_id == charge.payment_intent_id
    assert top_up.payment_intent_id.startswith("pi_")

    usage = list(records.usage_records)
    assert records.next_page_token == ""
    assert len(usage) == summary.totals.call_count == 3
    assert summary.totals.cost_micros == sum(record.cost_micros for record in usage)
    assert summary.totals.charged_micros == sum(record.charged_micros for record in usage)
    # 1,000 input tokens at $2.50/Mtok and the output at $10/Mtok, per call.
    assert summary.totals.cost_micros == 3 * 2_500 + (1_000 + 2_500 + 40) * 10
    assert summary.tenant.balance.balance_micros == 10_000_000 - summary.totals.charged_micros
