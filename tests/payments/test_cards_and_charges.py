"""Saved cards, top-ups and billing status end to end: gRPC -> server -> localstripe (HTTP)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
import stripe

from billing.v1 import account_pb2, admin_pb2, billing_pb2, types_pb2
from billing_service.domain.ledger import EntryKind
from billing_service.domain.payments import ChargeStatus, ChargeTrigger, TopUpAttempt
from billing_service.payments.events import PaymentIntentFacts
from billing_service.payments.reconcile import CardReconciler
from billing_service.storage.tables import ledger_entries
from tests.payments.conftest import (
    CARD_DECLINED,
    CARD_DECLINED_OFF_SESSION,
    CARD_NEEDS_AUTHENTICATION,
    CARD_OK,
    Payments,
    new_id,
)
from tests.support.grpc_errors import rich_error

METERED, INCLUDED = "gpt-4o", "gpt-4o-mini"


async def balance(payments: Payments, tenant_id: str) -> admin_pb2.Balance:
    answer = await payments.admin.GetTenant(admin_pb2.GetTenantRequest(tenant_id=tenant_id))
    return answer.tenant.balance


async def profile(payments: Payments, tenant_id: str) -> account_pb2.BillingProfile:
    answer = await payments.account.GetBillingProfile(
        account_pb2.GetBillingProfileRequest(tenant_id=tenant_id)
    )
    return answer.profile


async def reserve(
    payments: Payments, tenant_id: str, model: str, amount_micros: int
) -> types_pb2.Decision:
    answer = await payments.billing.ReserveCredit(
        billing_pb2.ReserveCreditRequest(
            request_id=new_id("reserve"),
            tenant_id=tenant_id,
            user_id="user-1",
            model=model,
            amount_micros=amount_micros,
        ),
        timeout=20.0,
    )
    return answer.decision


async def top_up_now(
    payments: Payments, tenant_id: str, amount_micros: int, request_id: str | None = None
) -> account_pb2.Charge:
    answer = await payments.account.TopUpNow(
        account_pb2.TopUpNowRequest(
            request_id=request_id or new_id("topup"),
            tenant_id=tenant_id,
            amount_micros=amount_micros,
        ),
        timeout=30.0,
    )
    return answer.charge


async def top_up_entries(payments: Payments, tenant_id: str) -> list[tuple[str, int, str]]:
    async with payments.app.engine.connect() as conn:
        rows = await conn.execute(
            ledger_entries.select()
            .where(
                ledger_entries.c.tenant_id == tenant_id,
                ledger_entries.c.kind.in_([EntryKind.TOP_UP, EntryKind.TOP_UP_REVERSAL]),
            )
            .order_by(ledger_entries.c.entry_id)
        )
        return [(row.kind, row.balance_delta_micros, row.charge_id) for row in rows]


async def test_setup_intent_flow_saves_the_card(payments: Payments) -> None:
    tenant_id = await payments.create_tenant()
    before = await balance(payments, tenant_id)
    assert before.effective_credit_limit_micros == 0

    saved = await payments.save_card(tenant_id, CARD_OK)

    assert saved.payment_method.brand == "visa"
    assert saved.payment_method.last4 == "4242"
    assert saved.payment_method.payment_method_id.startswith("pm_")
    assert saved.stripe_customer_id.startswith("cus_")
    assert saved.billing_status == types_pb2.BILLING_STATUS_GOOD_STANDING
    assert saved.auto_top_up.enabled
    after = await balance(payments, tenant_id)
    assert after.effective_credit_limit_micros == 25_000_000
    customer = payments.stripe.v1.customers.retrieve(saved.stripe_customer_id)
    assert customer.invoice_settings.default_payment_method == (
        saved.payment_method.payment_method_id
    )
    methods = payments.stripe.v1.payment_methods.list(
        {"customer": saved.stripe_customer_id, "type": "card"}
    )
    assert [m.id for m in methods.data] == [saved.payment_method.payment_method_id]


async def test_a_setup_intent_of_another_tenant_is_refused_and_changes_nothing(
    payments: Payments,
) -> None:
    victim, attacker = await payments.create_tenant(), await payments.create_tenant()
    victims_setup = await payments.start_setup(victim)
    payments.confirm_in_browser(victims_setup.setup_intent_id, CARD_OK)
    await payments.start_setup(attacker)  # the attacker has a customer of its own

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await payments.account.ConfirmPaymentMethod(
            account_pb2.ConfirmPaymentMethodRequest(
                request_id=new_id("confirm"),
                tenant_id=attacker,
                setup_intent_id=victims_setup.setup_intent_id,
            )
        )

    error = rich_error(raised.value)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "SETUP_INTENT_OF_ANOTHER_CUSTOMER"
    attackers = await profile(payments, attacker)
    assert not attackers.HasField("payment_method")
    assert (await balance(payments, attacker)).effective_credit_limit_micros == 0
    assert not (await profile(payments, victim)).HasField("payment_method")


async def test_a_card_declined_at_setup_is_not_saved(payments: Payments) -> None:
    tenant_id = await payments.create_tenant()
    started = await payments.start_setup(tenant_id)
    with pytest.raises(stripe.CardError):
        payments.confirm_in_browser(started.setup_intent_id, CARD_DECLINED)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await payments.account.ConfirmPaymentMethod(
            account_pb2.ConfirmPaymentMethodRequest(
                request_id=new_id("confirm"),
                tenant_id=tenant_id,
                setup_intent_id=started.setup_intent_id,
            )
        )

    assert rich_error(raised.value).reason == "SETUP_INTENT_NOT_SUCCEEDED"
    assert not (await profile(payments, tenant_id)).HasField("payment_method")


async def test_top_up_now_credits_once_and_replays(payments: Payments) -> None:
    tenant_id = await payments.create_tenant()
    await payments.save_card(tenant_id, CARD_OK)

    charge = await top_up_now(payments, tenant_id, 10_000_000, request_id="topup-once-" + tenant_id)
    replayed = await top_up_now(
        payments, tenant_id, 10_000_000, request_id="topup-once-" + tenant_id
    )

    assert charge.status == account_pb2.CHARGE_STATUS_SUCCEEDED
    assert charge.trigger == account_pb2.CHARGE_TRIGGER_MANUAL
    assert charge.payment_intent_id.startswith("pi_")
    assert replayed == charge
    assert (await balance(payments, tenant_id)).balance_micros == 10_000_000
    assert await top_up_entries(payments, tenant_id) == [
        (EntryKind.TOP_UP, 10_000_000, charge.charge_id)
    ]
    intent = payments.stripe.v1.payment_intents.retrieve(charge.payment_intent_id)
    assert (intent.amount, intent.status) == (1000, "succeeded")
    assert intent.metadata["charge_id"] == charge.charge_id
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await top_up_now(payments, tenant_id, 20_000_000, request_id="topup-once-" + tenant_id)
    assert rich_error(raised.value).reason == "REQUEST_ID_REUSED"
    got = await payments.account.GetCharge(
        account_pb2.GetChargeRequest(tenant_id=tenant_id, charge_id=charge.charge_id)
    )
    assert got.charge == charge


async def test_a_declined_charge_denies_metered_models_until_a_new_card(
    payments: Payments,
) -> None:
    tenant_id = await payments.create_tenant()
    await payments.save_card(tenant_id, CARD_DECLINED_OFF_SESSION)

    charge = await top_up_now(payments, tenant_id, 5_000_000)

    assert charge.status == account_pb2.CHARGE_STATUS_FAILED
    assert charge.failure_message
    failed = await profile(payments, tenant_id)
    assert failed.billing_status == types_pb2.BILLING_STATUS_PAYMENT_FAILED
    assert "declined" in failed.billing_status_message
    assert (await balance(payments, tenant_id)).balance_micros == 0
    denied = await reserve(payments, tenant_id, METERED, 1_000_000)
    assert not denied.allowed
    assert denied.reason == types_pb2.DENIAL_REASON_PAYMENT_FAILED
    assert "card" in denied.message
    assert (await reserve(payments, tenant_id, INCLUDED, 1_000_000)).allowed
    tenants = await payments.admin.ListTenants(
        admin_pb2.ListTenantsRequest(billing_status=types_pb2.BILLING_STATUS_PAYMENT_FAILED)
    )
    assert tenant_id in [tenant.tenant_id for tenant in tenants.tenants]

    renewed = await payments.save_card(tenant_id, CARD_OK)

    assert renewed.billing_status == types_pb2.BILLING_STATUS_GOOD_STANDING
    assert (await reserve(payments, tenant_id, METERED, 1_000_000)).allowed


async def test_a_charge_needing_authentication_waits_for_the_card_holder(
    payments: Payments,
) -> None:
    tenant_id = await payments.create_tenant()
    await payments.save_card(tenant_id, CARD_NEEDS_AUTHENTICATION)

    charge = await top_up_now(payments, tenant_id, 5_000_000)

    assert charge.status == account_pb2.CHARGE_STATUS_ACTION_REQUIRED
    assert (await profile(payments, tenant_id)).billing_status == (
        types_pb2.BILLING_STATUS_ACTION_REQUIRED
    )
    denied = await reserve(payments, tenant_id, METERED, 1_000_000)
    assert denied.reason == types_pb2.DENIAL_REASON_PAYMENT_ACTION_REQUIRED
    assert (await balance(payments, tenant_id)).balance_micros == 0

    # The card holder authenticates; Stripe reports the success by webhook.
    sink = payments.app.payments_sink
    assert sink is not None
    facts = PaymentIntentFacts(
        charge.payment_intent_id, None, 500, charge.charge_id, None, charge.create_time.ToDatetime()
    )
    await sink.payment_intent_succeeded(facts)
    await sink.payment_intent_succeeded(facts)

    assert (await profile(payments, tenant_id)).billing_status == (
        types_pb2.BILLING_STATUS_GOOD_STANDING
    )
    assert (await balance(payments, tenant_id)).balance_micros == 5_000_000
    assert len(await top_up_entries(payments, tenant_id)) == 1
    assert (await reserve(payments, tenant_id, METERED, 1_000_000)).allowed


async def test_low_credit_starts_an_automatic_top_up(payments: Payments) -> None:
    tenant_id = await payments.create_tenant()
    await payments.save_card(tenant_id, CARD_OK)

    # $25 limit - $21 held leaves $4, under the default $5 threshold.
    assert (await reserve(payments, tenant_id, METERED, 21_000_000)).allowed
    charge = await payments.settle_top_ups(tenant_id)

    assert charge.trigger is ChargeTrigger.AUTOMATIC
    assert charge.status is ChargeStatus.SUCCEEDED
    assert charge.amount_micros == 20_000_000
    money = await balance(payments, tenant_id)
    assert money.balance_micros == 20_000_000
    assert money.available_credit_micros == 24_000_000
    await payments.settle_top_ups(tenant_id)
    assert len(await payments.charges(tenant_id)) == 1  # above the threshold again: no more


async def test_auto_top_up_settings_are_validated_and_replayed(payments: Payments) -> None:
    tenant_id = await payments.create_tenant()
    request = account_pb2.UpdateAutoTopUpRequest(
        request_id=new_id("auto"), tenant_id=tenant_id, threshold_micros=0, amount_micros=990_000
    )
    first = await payments.account.UpdateAutoTopUp(request)
    again = await payments.account.UpdateAutoTopUp(request)
    assert first == again
    assert (first.auto_top_up.threshold_micros, first.auto_top_up.amount_micros) == (0, 990_000)

    for bad, field in (
        ({"amount_micros": 990_001}, "amount_micros"),
        ({"amount_micros": 490_000}, "amount_micros"),
        ({"threshold_micros": -1}, "threshold_micros"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await payments.account.UpdateAutoTopUp(
                account_pb2.UpdateAutoTopUpRequest(
                    request_id=new_id("auto"),
                    tenant_id=tenant_id,
                    **bad,  # type: ignore[arg-type]
                )
            )
        error = rich_error(raised.value)
        assert (error.code, error.fields) == (grpc.StatusCode.INVALID_ARGUMENT, [field])
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await payments.account.UpdateAutoTopUp(
            account_pb2.UpdateAutoTopUpRequest(
                request_id=request.request_id, tenant_id=tenant_id, enabled=False
            )
        )
    assert rich_error(raised.value).reason == "REQUEST_ID_REUSED"


async def test_automatic_top_up_off_or_declined_card_charges_nothing_more(
    payments: Payments,
) -> None:
    tenant_id = await payments.create_tenant()
    await payments.save_card(tenant_id, CARD_DECLINED_OFF_SESSION)
    await payments.account.UpdateAutoTopUp(
        account_pb2.UpdateAutoTopUpRequest(
            request_id=new_id("auto"), tenant_id=tenant_id, amount_micros=7_000_000
        )
    )

    assert (await reserve(payments, tenant_id, METERED, 21_000_000)).allowed
    declined = await payments.settle_top_ups(tenant_id)
    assert (declined.status, declined.amount_micros) == (ChargeStatus.FAILED, 7_000_000)
    await payments.settle_top_ups(tenant_id)
    assert len(await payments.charges(tenant_id)) == 1  # a failed card is not retried

    other = await payments.create_tenant()
    await payments.save_card(other, CARD_OK)
    settings = await payments.account.UpdateAutoTopUp(
        account_pb2.UpdateAutoTopUpRequest(
            request_id=new_id("auto"), tenant_id=other, enabled=False
        )
    )
    assert not settings.auto_top_up.enabled
    assert (await reserve(payments, other, METERED, 21_000_000)).allowed
    assert payments.app.charge_worker is not None
    await payments.app.charge_worker.run_once()
    assert await payments.charges(other) == []


async def test_a_reservation_without_room_waits_for_an_on_demand_top_up(
    payments: Payments,
) -> None:
    tenant_id = await payments.create_tenant(credit_limit_micros=1_000_000)
    await payments.save_card(tenant_id, CARD_OK)
    await payments.account.UpdateAutoTopUp(
        account_pb2.UpdateAutoTopUpRequest(
            request_id=new_id("auto"), tenant_id=tenant_id, threshold_micros=0
        )
    )

    decision = await reserve(payments, tenant_id, METERED, 3_000_000)

    assert decision.allowed
    [charge] = await payments.charges(tenant_id)
    assert (charge.trigger, charge.status) == (ChargeTrigger.ON_DEMAND, ChargeStatus.SUCCEEDED)
    assert charge.amount_micros == 20_000_000
    money = await balance(payments, tenant_id)
    assert (money.balance_micros, money.held_micros) == (20_000_000, 3_000_000)


async def test_a_reservation_denied_before_credit_landed_takes_it_without_a_second_charge(
    payments: Payments,
) -> None:
    """Concurrent reservations without room: the first one's top-up can land between another's
    denial and that one's own call for a top-up. That call must find the room, not charge the
    card again."""
    tenant_id = await payments.create_tenant(credit_limit_micros=1_000_000)
    await payments.save_card(tenant_id, CARD_OK)
    await payments.account.UpdateAutoTopUp(
        account_pb2.UpdateAutoTopUpRequest(
            request_id=new_id("auto"), tenant_id=tenant_id, threshold_micros=0
        )
    )
    on_demand = payments.app.core.top_up
    assert on_demand is not None

    class CreditLandsFirst:
        def credit_seen(self, tenant_id: str, available_micros: int) -> None:
            on_demand.credit_seen(tenant_id, available_micros)

        async def top_up(self, *args: Any, **kwargs: Any) -> TopUpAttempt:
            # Stands for the other reservation's $20 top-up, landing just before this call.
            await payments.admin.GrantCredit(
                admin_pb2.GrantCreditRequest(
                    request_id=new_id("grant"),
                    tenant_id=tenant_id,
                    amount_micros=20_000_000,
                    reason="the other reservation's top-up",
                )
            )
            return await on_demand.top_up(*args, **kwargs)

    payments.app.core.top_up = CreditLandsFirst()

    decision = await reserve(payments, tenant_id, METERED, 3_000_000)

    assert decision.allowed
    assert await payments.charges(tenant_id) == []
    money = await balance(payments, tenant_id)
    assert (money.balance_micros, money.held_micros) == (20_000_000, 3_000_000)


async def test_an_on_demand_top_up_that_is_declined_denies_the_reservation(
    payments: Payments,
) -> None:
    tenant_id = await payments.create_tenant(credit_limit_micros=1_000_000)
    await payments.save_card(tenant_id, CARD_DECLINED_OFF_SESSION)

    decision = await reserve(payments, tenant_id, METERED, 3_000_000)

    assert not decision.allowed
    assert decision.reason == types_pb2.DENIAL_REASON_PAYMENT_FAILED
    [charge] = await payments.charges(tenant_id)
    assert (charge.trigger, charge.status) == (ChargeTrigger.ON_DEMAND, ChargeStatus.FAILED)
    assert (await balance(payments, tenant_id)).balance_micros == 0


async def test_removing_the_card_detaches_it_and_ends_the_credit_limit(
    payments: Payments,
) -> None:
    tenant_id = await payments.create_tenant()
    saved = await payments.save_card(tenant_id, CARD_OK)

    removed = await payments.account.RemovePaymentMethod(
        account_pb2.RemovePaymentMethodRequest(request_id=new_id("remove"), tenant_id=tenant_id)
    )

    assert not removed.profile.HasField("payment_method")
    assert (await balance(payments, tenant_id)).effective_credit_limit_micros == 0
    method = payments.stripe.v1.payment_methods.retrieve(saved.payment_method.payment_method_id)
    assert method.customer is None
    denied = await reserve(payments, tenant_id, METERED, 1_000_000)
    assert denied.reason == types_pb2.DENIAL_REASON_PAYMENT_METHOD_REQUIRED
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await top_up_now(payments, tenant_id, 5_000_000)
    assert rich_error(raised.value).reason == "NO_PAYMENT_METHOD"


async def test_webhook_and_reconciliation_learn_card_changes_made_at_stripe(
    payments: Payments,
) -> None:
    tenant_id = await payments.create_tenant()
    started = await payments.start_setup(tenant_id)
    payments.confirm_in_browser(started.setup_intent_id, CARD_OK)
    sink = payments.app.payments_sink
    assert sink is not None
    intent = payments.stripe.v1.setup_intents.retrieve(started.setup_intent_id)

    # setup_intent.succeeded saves the card as ConfirmPaymentMethod would (and only once).
    for _ in range(2):
        await sink.setup_intent_succeeded(
            setup_intent_id=started.setup_intent_id,
            customer_id=started.stripe_customer_id,
            payment_method_id=str(intent.payment_method),
            occurred_at=datetime.now(UTC),
        )
    saved = await profile(payments, tenant_id)
    assert saved.payment_method.payment_method_id == intent.payment_method
    assert (await balance(payments, tenant_id)).effective_credit_limit_micros == 25_000_000

    # The card is detached at Stripe and the webhook is lost: reconciliation finds out.
    payments.stripe.v1.payment_methods.detach(saved.payment_method.payment_method_id)
    assert payments.app.account is not None
    reconciler = CardReconciler(payments.app.account.store, payments.app.account.gateway)
    assert await reconciler.reconcile_once() == 1
    assert await reconciler.reconcile_once() == 0

    assert not (await profile(payments, tenant_id)).HasField("payment_method")
    assert (await balance(payments, tenant_id)).effective_credit_limit_micros == 0
