"""`billingctl` against a live server whose tenants pay by card at localstripe."""

from __future__ import annotations

import asyncio

from billing.v1 import account_pb2
from tests.ctl.conftest import Result, run_ctl
from tests.e2e.conftest import serving
from tests.payments.conftest import CARD_DECLINED_OFF_SESSION, CARD_OK
from tests.support.localstripe import LocalStripe


async def test_tenants_in_payment_failed_are_listed_and_summarised(
    database_url: str, localstripe: LocalStripe
) -> None:
    async with serving(database_url, localstripe.url, localstripe.url) as stack:
        declined, paying = await stack.create_tenant(), await stack.create_tenant()
        await stack.save_card(declined, CARD_DECLINED_OFF_SESSION)
        await stack.save_card(paying, CARD_OK)
        failed = await stack.top_up_now(declined, 5_000_000)
        succeeded = await stack.top_up_now(paying, 5_000_000)
        assert failed.status == account_pb2.CHARGE_STATUS_FAILED
        assert succeeded.status == account_pb2.CHARGE_STATUS_SUCCEEDED

        async def ctl(*args: str) -> Result:
            # The CLI blocks; the server runs on this event loop.
            result = await asyncio.to_thread(run_ctl, "--target", stack.target, *args)
            assert result.code == 0, result.stderr
            return result

        listed = await ctl("tenants", "list", "--billing-status", "payment-failed", "--json")
        table = await ctl("tenants", "list", "--billing-status", "payment-failed")
        summary = await ctl("summary", declined)
        summary_json = await ctl("summary", declined, "--json")
        statement = await ctl("ledger", "list", paying, "--json")
        statement_table = await ctl("ledger", "list", paying)

    assert [tenant["tenant_id"] for tenant in listed.json()["tenants"]] == [declined]
    assert declined in table.stdout
    assert paying not in table.stdout
    fields = summary.fields()
    assert fields["Tenant"] == declined
    assert fields["Card"] == "visa ending 0341"
    assert fields["Billing status"] == "payment failed"
    assert "declined" in fields["Billing note"]
    profile = summary_json.json()["billing_profile"]
    assert profile["billing_status"] == "BILLING_STATUS_PAYMENT_FAILED"
    assert profile["payment_method"]["last4"] == "0341"
    [top_up] = [
        entry
        for entry in statement.json()["ledger_entries"]
        if entry["kind"] == "LEDGER_ENTRY_KIND_TOP_UP"
    ]
    assert top_up["charge_id"] == succeeded.charge_id
    assert top_up["payment_intent_id"] == succeeded.payment_intent_id
    assert top_up["balance_delta_micros"] == "5000000"
    assert succeeded.charge_id in statement_table.stdout
