"""The charge outbox worker: turns pending charge rows into Stripe PaymentIntents, exactly once.

A charge row is written (pending) by the transaction that decides it. This worker claims due
rows with a lease (SKIP LOCKED on PostgreSQL, so replicas share the work), calls Stripe with
the idempotency key `charge-<charge_id>`, and records the answer in one transaction. If the
process dies anywhere in between, the row stays pending, its lease runs out, and the next
attempt sends the same key: Stripe replays the first PaymentIntent instead of charging again,
and the conditional status change credits the ledger only once.

It also decides automatic top-ups: each round, tenants under their threshold and under their
monthly ceiling get a charge row (decided and written by one statement, guarded by the
one-pending-charge-per-tenant index).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from billing_service.domain.errors import Unavailable
from billing_service.domain.payments import (
    OUTCOME_STATUS,
    Charge,
    ChargeStatus,
    TopUpAttempt,
    micros_to_cents,
    on_demand_amount,
)
from billing_service.payments.gateway import GatewayUnavailable, PaymentGateway
from billing_service.storage.payments_store import ClaimedCharge, PaymentsStore

_log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

# Stripe keeps an idempotency key for 24 hours. Past that a resend could charge a second time,
# so an older pending charge is left for an operator (and logged) instead of being resent.
RESEND_LIMIT = timedelta(hours=20)


def new_charge_id() -> str:
    return f"chg_{uuid.uuid4().hex}"


def idempotency_key(charge_id: str) -> str:
    return f"charge-{charge_id}"


class ChargeWorker:
    def __init__(
        self,
        store: PaymentsStore,
        gateway: PaymentGateway,
        clock: Clock,
        *,
        poll_interval_s: float = 5.0,
        lease: timedelta = timedelta(seconds=60),
        batch: int = 20,
        wait_check_s: float = 0.5,
    ) -> None:
        self._store = store
        self._gateway = gateway
        self._clock = clock
        self._poll_interval_s = poll_interval_s
        self._lease = lease
        self._batch = batch
        self._wait_check_s = wait_check_s
        self._wake = asyncio.Event()
        self._recorded = asyncio.Condition()

    def nudge(self) -> None:
        """Something may be due (low credit seen, a charge enqueued): run a round now."""
        self._wake.set()

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await self.run_once()
            except (Unavailable, GatewayUnavailable) as error:
                _log.warning("charge worker round failed, will retry: %s", error)
            except Exception:
                _log.exception("charge worker round failed, will retry")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval_s):
                    wake = asyncio.create_task(self._wake.wait())
                    stop = asyncio.create_task(stopping.wait())
                    try:
                        await asyncio.wait({wake, stop}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        wake.cancel()
                        stop.cancel()
            self._wake.clear()

    async def run_once(self) -> int:
        """One round: enqueue due automatic top-ups, then charge what is due. Returns how
        many charges were sent to Stripe."""
        for tenant_id in await self._store.tenants_due_for_top_up(self._batch, self._clock()):
            if await self._store.enqueue_automatic(tenant_id, new_charge_id(), self._clock()):
                _log.info("automatic top-up enqueued for tenant %s", tenant_id)
        sent = 0
        while claimed := await self._store.claim_due(self._clock(), self._lease, self._batch):
            for item in claimed:
                await self._send(item)
                sent += 1
        return sent

    async def _send(self, item: ClaimedCharge) -> None:
        charge = item.charge
        if self._clock() - charge.created_at > RESEND_LIMIT:
            _log.error(
                "charge %s of tenant %s is pending for more than %s: not resent (Stripe may "
                "have forgotten its idempotency key); check the PaymentIntent with metadata "
                "charge_id=%s in Stripe and resolve it",
                charge.charge_id,
                charge.tenant_id,
                RESEND_LIMIT,
                charge.charge_id,
            )
            return
        if item.payment_method_id is None or item.stripe_customer_id is None:
            # The card was removed while the charge waited: nothing to charge, nobody to blame.
            await self._record(
                charge, ChargeStatus.FAILED, None, "No card on file.", card_problem=False
            )
            return
        try:
            result = await self._gateway.charge(
                customer_id=item.stripe_customer_id,
                payment_method_id=item.payment_method_id,
                amount_cents=micros_to_cents(charge.amount_micros),
                charge_id=charge.charge_id,
                idempotency_key=idempotency_key(charge.charge_id),
            )
        except GatewayUnavailable as error:
            # Left pending: when the lease runs out the same key is sent again.
            _log.warning("charge %s: Stripe unavailable, will retry: %s", charge.charge_id, error)
            return
        if result.outcome is None:
            _log.info("charge %s: Stripe is still processing it", charge.charge_id)
            return
        await self._record(
            charge, OUTCOME_STATUS[result.outcome], result.payment_intent_id, result.failure_message
        )

    async def _record(
        self,
        charge: Charge,
        status: ChargeStatus,
        payment_intent_id: str | None,
        failure_message: str | None,
        *,
        card_problem: bool = True,
    ) -> None:
        after = await self._store.record_outcome(
            charge.charge_id,
            status,
            payment_intent_id,
            failure_message,
            self._clock(),
            card_problem=card_problem,
        )
        _log.info(
            "charge %s of tenant %s: %s",
            charge.charge_id,
            charge.tenant_id,
            None if after is None else after.status,
        )
        await self.notify_recorded()

    async def notify_recorded(self) -> None:
        async with self._recorded:
            self._recorded.notify_all()

    async def wait_until_settled(self, charge_id: str, timeout_s: float) -> Charge | None:
        """The charge once it is no longer pending, or as it is when `timeout_s` has passed.

        Woken when this process records an outcome; also re-reads every `wait_check_s`
        because another replica (or a webhook) may record it.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        while True:
            charge = await self._store.get_charge(charge_id)
            left = deadline - loop.time()
            if charge is None or charge.status is not ChargeStatus.PENDING or left <= 0:
                return charge
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, self._wait_check_s)), self._recorded:
                    await self._recorded.wait()


class OnDemandTopUp:
    """The core's TopUpPort: a reservation without room waits for a card top-up."""

    def __init__(self, store: PaymentsStore, worker: ChargeWorker, clock: Clock) -> None:
        self._store = store
        self._worker = worker
        self._clock = clock
        self._nudge_below_micros = store.defaults.threshold_micros

    def credit_seen(self, tenant_id: str, available_micros: int) -> None:
        if available_micros < self._nudge_below_micros:
            self._worker.nudge()

    async def top_up(self, tenant_id: str, shortfall_micros: int, wait_s: float) -> TopUpAttempt:
        """Starts (or joins) a top-up of the tenant and waits for it."""
        if wait_s <= 0:
            return TopUpAttempt.NOT_ELIGIBLE
        at_least = on_demand_amount(0, shortfall_micros)
        now = self._clock()
        await self._store.enqueue_automatic(
            tenant_id, new_charge_id(), now, at_least_micros=at_least
        )
        pending = await self._store.pending_charge(tenant_id)
        if pending is None:
            if await self._store.ceiling_blocks_top_up(tenant_id, now, at_least_micros=at_least):
                return TopUpAttempt.LIMIT_REACHED
            return TopUpAttempt.NOT_ELIGIBLE  # no card, payment problem, auto top-up off
        self._worker.nudge()
        settled = await self._worker.wait_until_settled(pending.charge_id, wait_s)
        if settled is not None and settled.status is ChargeStatus.SUCCEEDED:
            return TopUpAttempt.SUCCEEDED
        return TopUpAttempt.FAILED
