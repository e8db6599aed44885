"""StripeEventSink over the payments store: webhook facts applied idempotently, in any order.

Each fact becomes a conditional change: a charge's status only moves forward
(domain.payments.ALLOWED_BEFORE), the TOP_UP credit is written by whichever of the worker and
the webhook records success first, refunds and disputes are reversed up to a cumulative total,
so a duplicate or a late fact changes nothing twice.

"Newer" is decided by our own data, never by delivery order: a charge's outcome moves the
tenant's billing status only if it is the tenant's latest charge (storage.charge_sql), and a
succeeded SetupIntent saves its card only if we created it after the newest card fact (the
SetupIntent of the card on file, or the card's removal).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from billing_service.domain.errors import FailedPrecondition, NotFound
from billing_service.domain.payments import BillingStatus, ChargeStatus, cents_to_micros
from billing_service.payments.account import AccountCore
from billing_service.payments.events import PaymentIntentFacts
from billing_service.payments.outbox import ChargeOutcomes, ChargeWorker, outcome_label
from billing_service.storage.payments_store import PaymentsStore

_log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


class PaymentsEventSink:
    def __init__(
        self,
        store: PaymentsStore,
        account: AccountCore,
        worker: ChargeWorker | None,
        clock: Clock,
        outcomes: ChargeOutcomes | None = None,
    ) -> None:
        self._store = store
        self._account = account
        self._worker = worker
        self._clock = clock
        self._outcomes = outcomes

    async def payment_intent_succeeded(self, facts: PaymentIntentFacts) -> None:
        await self._record(facts, ChargeStatus.SUCCEEDED)

    async def payment_intent_failed(self, facts: PaymentIntentFacts) -> None:
        await self._record(facts, ChargeStatus.FAILED)

    async def payment_intent_requires_action(self, facts: PaymentIntentFacts) -> None:
        await self._record(facts, ChargeStatus.ACTION_REQUIRED)

    async def _record(self, facts: PaymentIntentFacts, status: ChargeStatus) -> None:
        charge = None
        if facts.charge_id is not None:
            charge = await self._store.get_charge(facts.charge_id)
        if charge is None:
            charge = await self._store.charge_of_payment_intent(facts.payment_intent_id)
        if charge is None:
            _log.info("ignoring PaymentIntent %s: not a charge of ours", facts.payment_intent_id)
            return
        if cents_to_micros(facts.amount_cents) != charge.amount_micros:
            _log.warning(
                "PaymentIntent %s amount %d cents does not match charge %s; ignored",
                facts.payment_intent_id,
                facts.amount_cents,
                charge.charge_id,
            )
            return
        recorded = await self._store.record_outcome(
            charge.charge_id,
            status,
            facts.payment_intent_id,
            facts.failure_message,
            self._clock(),
        )
        if recorded.moved and self._outcomes is not None:
            self._outcomes.charge_recorded(charge.trigger, outcome_label(status))
        if recorded.moved and charge.status is ChargeStatus.FAILED:
            # Only its holder confirming the declined PaymentIntent again does this.
            _log.warning(
                "charge %s of tenant %s succeeded after Stripe had declined it; it counts "
                "against the monthly ceiling of the month it was made in",
                charge.charge_id,
                charge.tenant_id,
            )
        if self._worker is not None:
            await self._worker.notify_recorded()

    async def payment_method_detached(
        self, *, payment_method_id: str, customer_id: str | None, occurred_at: datetime
    ) -> None:
        for tenant_id in await self._store.tenants_with_card(payment_method_id):
            await self._store.forget_card(tenant_id, payment_method_id, self._clock())

    async def setup_intent_succeeded(
        self,
        *,
        setup_intent_id: str,
        customer_id: str | None,
        payment_method_id: str | None,
        occurred_at: datetime,
    ) -> None:
        if customer_id is None:
            return
        tenant_id = await self._store.tenant_of_customer(customer_id)
        if tenant_id is None:
            return
        profile = await self._store.get_profile(tenant_id)
        saved = None if profile is None or profile.card is None else profile.card.payment_method_id
        if profile is None or saved == payment_method_id:
            return
        created = await self._store.setup_intent_created(setup_intent_id)
        if created is None or created[0] != tenant_id:
            _log.info(
                "setup_intent.succeeded %s: not a SetupIntent this service created for tenant "
                "%s; ignored (ConfirmPaymentMethod saves it)",
                setup_intent_id,
                tenant_id,
            )
            return
        if profile.card_fact_at is not None and created[1] <= profile.card_fact_at:
            _log.info(
                "setup_intent.succeeded %s: older than tenant %s's card on file (or its "
                "removal); ignored",
                setup_intent_id,
                tenant_id,
            )
            return
        try:
            await self._account.save_card_of_setup_intent(
                profile, setup_intent_id, only_if_newer=True
            )
        except (FailedPrecondition, NotFound) as error:
            _log.warning("setup_intent.succeeded %s not saved: %s", setup_intent_id, error)

    async def charge_refunded(
        self, *, payment_intent_id: str, amount_refunded_cents: int, occurred_at: datetime
    ) -> None:
        await self._store.reverse_top_up(
            payment_intent_id, cents_to_micros(amount_refunded_cents), self._clock()
        )

    async def dispute_created(
        self, *, payment_intent_id: str | None, customer_id: str | None, occurred_at: datetime
    ) -> None:
        tenant_id = None
        if payment_intent_id is not None:
            charge = await self._store.reverse_top_up(payment_intent_id, None, self._clock())
            tenant_id = None if charge is None else charge.tenant_id
        if tenant_id is None and customer_id is not None:
            tenant_id = await self._store.tenant_of_customer(customer_id)
        if tenant_id is not None:
            await self._store.set_billing_status(tenant_id, BillingStatus.DISPUTED, self._clock())
