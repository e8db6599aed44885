"""The charge outbox worker: turns pending charge rows into Stripe PaymentIntents, exactly once,
and learns the outcome of every charge that may have reached Stripe.

A charge row is written (pending, with the customer, card and currency it will use) by the
transaction that decides it. The worker claims due rows with a lease (SKIP LOCKED on
PostgreSQL, most overdue first, so replicas share the work) and gives each its own task, at
most `concurrency` at once, so one tenant's slow Stripe calls never hold up another's. Each
attempt re-reads the charge under its claim, then does what domain.charge_attempts decides:
send the PaymentIntent create with the idempotency key `charge-<charge_id>` and the fixed
parameters (Stripe replays the first answer of a key it has seen), read the PaymentIntent by
id, or, once Stripe may have forgotten the key, find it by the charge id in its metadata. A
Stripe call is cut off at half the lease, so no lease runs out under a running call, and every
record is conditional on the claim. If the process dies anywhere, the lease runs out and the
next attempt learns the same outcome; a charge whose outcome cannot be learned is never marked
failed: it stays pending (retried with a growing delay) or, when Stripe's answer is
ambiguous, is left UNRESOLVED for an operator.

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
from typing import Protocol

from billing_service.domain.charge_attempts import (
    FIND_SINCE_MARGIN,
    ChargeStep,
    abandon_reason,
    next_step,
    retry_delay,
)
from billing_service.domain.errors import Unavailable
from billing_service.domain.payments import (
    OUTCOME_STATUS,
    Charge,
    ChargeStatus,
    ChargeTrigger,
    TopUpAttempt,
    cents_to_micros,
    micros_to_cents,
    on_demand_amount,
)
from billing_service.payments.gateway import (
    GatewayRefused,
    GatewayUnavailable,
    PaymentGateway,
    PaymentResult,
)
from billing_service.storage.charge_store import ClaimedCharge
from billing_service.storage.payments_store import PaymentsStore

_log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

# How often a PaymentIntent Stripe is still processing is read again.
_PROCESSING_RECHECK = timedelta(seconds=5)
# Outcome labels of billing_charges_total besides the charge statuses.
UNKNOWN = "unknown"


class ChargeOutcomes(Protocol):
    """Where recorded charge outcomes are counted (Metrics.charge_recorded)."""

    def charge_recorded(self, trigger: ChargeTrigger, outcome: str) -> None: ...


def new_charge_id() -> str:
    return f"chg_{uuid.uuid4().hex}"


def idempotency_key(charge_id: str) -> str:
    return f"charge-{charge_id}"


def outcome_label(status: ChargeStatus) -> str:
    return UNKNOWN if status is ChargeStatus.UNRESOLVED else str(status)


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
        concurrency: int = 8,
        wait_check_s: float = 0.5,
        currency: str = "usd",
        outcomes: ChargeOutcomes | None = None,
    ) -> None:
        self._store = store
        self._gateway = gateway
        self._clock = clock
        self._poll_interval_s = poll_interval_s
        self._lease = lease
        # A Stripe call gives up at half the lease: the lease outlives every call.
        self._call_budget_s = lease.total_seconds() / 2
        self._batch = batch
        self._concurrency = concurrency
        self._wait_check_s = wait_check_s
        self._currency = currency
        self._outcomes = outcomes
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._recorded = asyncio.Condition()
        self._in_flight: set[asyncio.Task[None]] = set()

    @property
    def lease(self) -> timedelta:
        return self._lease

    def nudge(self) -> None:
        """Something may be due (low credit seen, a charge enqueued): run a round now."""
        self._wake.set()

    async def run(self, stopping: asyncio.Event) -> None:
        try:
            while not stopping.is_set():
                saturated = False
                try:
                    await self._enqueue_due()
                    await self._fill()
                    saturated = len(self._in_flight) >= self._concurrency
                except (Unavailable, GatewayUnavailable) as error:
                    _log.warning("charge worker round failed, will retry: %s", error)
                except Exception:
                    _log.exception("charge worker round failed, will retry")
                await self._idle(stopping, saturated)
            if self._in_flight:
                await asyncio.wait(set(self._in_flight))
        finally:
            for task in self._in_flight:
                task.cancel()

    async def _idle(self, stopping: asyncio.Event, saturated: bool) -> None:
        """Until the next round is due: a nudge, the poll interval, or (when every slot was
        busy) an attempt finishing."""
        self._slot_freed.clear()
        waits = {asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stopping.wait())}
        if saturated:
            waits.add(asyncio.ensure_future(self._slot_freed.wait()))
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval_s):
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        self._wake.clear()

    async def run_once(self) -> int:
        """One round: enqueue due automatic top-ups, then attempt every due charge (at most
        `concurrency` at once) until none is due and none of this process is in flight.
        Returns how many attempts this round started."""
        await self._enqueue_due()
        attempts = 0
        try:
            while True:
                attempts += await self._fill()
                running = {task for task in self._in_flight if not task.done()}
                if not running:
                    return attempts
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            for task in self._in_flight:
                task.cancel()
            raise

    async def _enqueue_due(self) -> None:
        for tenant_id in await self._store.tenants_due_for_top_up(self._batch, self._clock()):
            if await self._store.enqueue_automatic(tenant_id, new_charge_id(), self._clock()):
                _log.info("automatic top-up enqueued for tenant %s", tenant_id)

    async def _fill(self) -> int:
        """Claims as many due charges as there are free slots and starts an attempt of each."""
        free = min(self._concurrency - len(self._in_flight), self._batch)
        if free <= 0:
            return 0
        claimed = await self._store.claim_due(self._clock(), self._lease, free)
        for item in claimed:
            task = asyncio.create_task(self._attempt(item), name=f"charge {item.charge.charge_id}")
            self._in_flight.add(task)
            task.add_done_callback(self._finished)
        return len(claimed)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._slot_freed.set()

    async def _attempt(self, item: ClaimedCharge) -> None:
        charge = item.charge
        try:
            await self._resolve(item)
        except (Unavailable, GatewayUnavailable) as error:
            _log.warning(
                "charge %s: attempt failed, retried after its lease: %s", charge.charge_id, error
            )
        except Exception:
            # Left pending with its lease: the next attempt starts over once it runs out.
            _log.exception("charge %s: attempt failed, retried after its lease", charge.charge_id)
            self._count(charge.trigger, UNKNOWN)
        finally:
            await self.notify_recorded()

    async def _resolve(self, item: ClaimedCharge) -> None:
        charge = item.charge
        step = next_step(
            charge, self._clock(), card_on_file=item.card_on_file, tenant_active=item.tenant_active
        )
        if step is ChargeStep.ABANDON:
            why = abandon_reason(
                charge, card_on_file=item.card_on_file, tenant_active=item.tenant_active
            )
            await self._record(item, ChargeStatus.FAILED, None, why, card_problem=False)
            return
        if step is ChargeStep.FIND:
            await self._find(item, "Stripe may have forgotten its idempotency key")
            return
        try:
            async with asyncio.timeout(self._call_budget_s):
                if step is ChargeStep.READ:
                    assert charge.payment_intent_id is not None
                    result = await self._gateway.get_payment(charge.payment_intent_id)
                else:
                    if not await self._store.begin_attempt(
                        charge.charge_id, item.claim_token, self._clock()
                    ):
                        _log.info("charge %s: taken over or settled; not sent", charge.charge_id)
                        return
                    result = await self._send(charge)
        except GatewayRefused as error:
            # Refused up front: this request charged nothing, but an earlier one with the same
            # key may have: what Stripe holds for the charge decides.
            await self._find(item, f"Stripe refused the request: {error}")
            return
        except (GatewayUnavailable, TimeoutError) as error:
            await self._retry_later(item, f"{type(error).__name__}: {error}")
            return
        await self._learned(item, result)

    async def _send(self, charge: Charge) -> PaymentResult:
        assert charge.stripe_customer_id is not None
        assert charge.payment_method_id is not None
        return await self._gateway.charge(
            customer_id=charge.stripe_customer_id,
            payment_method_id=charge.payment_method_id,
            amount_cents=micros_to_cents(charge.amount_micros),
            currency=charge.currency or self._currency,
            charge_id=charge.charge_id,
            idempotency_key=idempotency_key(charge.charge_id),
        )

    async def _find(self, item: ClaimedCharge, why: str) -> None:
        """Learns the outcome from the PaymentIntents Stripe has for the charge."""
        charge = item.charge
        if charge.stripe_customer_id is None:
            await self._unresolved(item, f"{why}; the charge has no Stripe customer to search")
            return
        try:
            async with asyncio.timeout(self._call_budget_s):
                found = await self._gateway.find_payments(
                    customer_id=charge.stripe_customer_id,
                    charge_id=charge.charge_id,
                    created_since=charge.created_at - FIND_SINCE_MARGIN,
                )
        except (GatewayUnavailable, TimeoutError) as error:
            await self._retry_later(item, f"looking it up: {type(error).__name__}: {error}")
            return
        except GatewayRefused as error:
            await self._unresolved(item, f"{why}; Stripe could not be searched: {error}")
            return
        if not found:
            # No PaymentIntent names the charge: nothing was charged, nobody to blame.
            message = f"Not made: {why}, and Stripe has no PaymentIntent for the charge."
            await self._record(item, ChargeStatus.FAILED, None, message, card_problem=False)
            return
        if len(found) > 1:
            ids = ", ".join(str(result.payment_intent_id) for result in found)
            await self._unresolved(item, f"{why}; Stripe has {len(found)} PaymentIntents: {ids}")
            return
        await self._learned(item, found[0])

    async def _learned(self, item: ClaimedCharge, result: PaymentResult) -> None:
        """Records what Stripe says of the charge's PaymentIntent."""
        charge = item.charge
        currency = charge.currency or self._currency
        if (
            result.amount_cents is not None
            and cents_to_micros(result.amount_cents) != charge.amount_micros
        ) or (result.currency is not None and result.currency.lower() != currency.lower()):
            await self._unresolved(
                item,
                f"PaymentIntent {result.payment_intent_id} is for {result.amount_cents} "
                f"{result.currency}, not the charge's amount",
            )
            return
        if result.outcome is None:
            _log.info("charge %s: Stripe is still processing it", charge.charge_id)
            await self._retry_later(
                item,
                "processing",
                delay=_PROCESSING_RECHECK,
                payment_intent_id=result.payment_intent_id,
            )
            return
        await self._record(
            item, OUTCOME_STATUS[result.outcome], result.payment_intent_id, result.failure_message
        )

    async def _retry_later(
        self,
        item: ClaimedCharge,
        why: str,
        *,
        delay: timedelta | None = None,
        payment_intent_id: str | None = None,
    ) -> None:
        charge = item.charge
        now = self._clock()
        wait = delay or retry_delay(charge.attempts)
        if await self._store.retry_later(
            charge.charge_id, item.claim_token, now + wait, now, payment_intent_id=payment_intent_id
        ):
            _log.warning(
                "charge %s of tenant %s: outcome unknown (%s); asking Stripe again in %s",
                charge.charge_id,
                charge.tenant_id,
                why,
                wait,
            )
        if delay is None:
            self._count(charge.trigger, UNKNOWN)

    async def _unresolved(self, item: ClaimedCharge, why: str) -> None:
        _log.error(
            "charge %s of tenant %s needs an operator: %s (AdminService.ResolveCharge)",
            item.charge.charge_id,
            item.charge.tenant_id,
            why,
        )
        await self._record(item, ChargeStatus.UNRESOLVED, None, why[:500])

    async def _record(
        self,
        item: ClaimedCharge,
        status: ChargeStatus,
        payment_intent_id: str | None,
        failure_message: str | None,
        *,
        card_problem: bool = True,
    ) -> None:
        charge = item.charge
        recorded = await self._store.record_outcome(
            charge.charge_id,
            status,
            payment_intent_id,
            failure_message,
            self._clock(),
            card_problem=card_problem,
            claim_token=item.claim_token,
        )
        after = recorded.charge
        if recorded.moved:
            self._count(charge.trigger, outcome_label(status))
        _log.info(
            "charge %s of tenant %s: %s",
            charge.charge_id,
            charge.tenant_id,
            None if after is None else after.status,
        )

    def _count(self, trigger: ChargeTrigger, outcome: str) -> None:
        if self._outcomes is not None:
            self._outcomes.charge_recorded(trigger, outcome)

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

    async def top_up(
        self, tenant_id: str, hold_micros: int, shortfall_micros: int, wait_s: float
    ) -> TopUpAttempt:
        """Starts (or joins) a top-up of the tenant and waits for it."""
        if wait_s <= 0:
            return TopUpAttempt.NOT_ELIGIBLE
        at_least = on_demand_amount(0, shortfall_micros)
        now = self._clock()
        await self._store.enqueue_automatic(
            tenant_id, new_charge_id(), now, at_least_micros=at_least, hold_micros=hold_micros
        )
        pending = await self._store.pending_charge(tenant_id)
        if pending is None:
            if await self._store.ceiling_blocks_top_up(
                tenant_id, now, at_least_micros=at_least, hold_micros=hold_micros
            ):
                return TopUpAttempt.LIMIT_REACHED
            # No card, a payment problem, auto top-up off; or credit landed since the denial.
            return TopUpAttempt.NOT_ELIGIBLE
        self._worker.nudge()
        settled = await self._worker.wait_until_settled(pending.charge_id, wait_s)
        if settled is not None and settled.status is ChargeStatus.SUCCEEDED:
            return TopUpAttempt.SUCCEEDED
        return TopUpAttempt.FAILED
