"""Operators and card charges: list them (those waiting for an operator first of all) and
resolve one whose outcome the worker could not learn.

A resolution states what Stripe did (SUCCEEDED: the card was charged, by this PaymentIntent;
FAILED: it was not) and is checked against Stripe before it is recorded: a success needs a
succeeded PaymentIntent of the charge's amount, a failure needs that none of the charge's
PaymentIntents took money or may still. It is recorded only while no worker is asking Stripe
about the charge, credits the ledger once like any success, and is idempotent by request_id.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from datetime import datetime

from billing_service.domain.charge_attempts import FIND_SINCE_MARGIN
from billing_service.domain.commands import check_id, check_reason
from billing_service.domain.errors import (
    ErrorReason,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    request_id_reused,
)
from billing_service.domain.page_tokens import (
    PageTokens,
    filters_fingerprint,
    position_text,
    position_time,
)
from billing_service.domain.payments import (
    OPEN_STATUSES,
    Charge,
    ChargeStatus,
    PaymentOutcome,
    cents_to_micros,
    check_charge_id,
)
from billing_service.payments.gateway import (
    GatewayNotFound,
    GatewayRefused,
    GatewayUnavailable,
    PaymentGateway,
    PaymentResult,
)
from billing_service.payments.outbox import ChargeOutcomes, outcome_label
from billing_service.storage.payments_store import PaymentsStore

_log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

RESOLUTIONS = (ChargeStatus.SUCCEEDED, ChargeStatus.FAILED)
_PAGE_SIZE_DEFAULT = 100
_PAGE_SIZE_MAX = 1000


class ChargeResolution:
    def __init__(
        self,
        store: PaymentsStore,
        gateway: PaymentGateway | None,
        clock: Clock,
        page_tokens: PageTokens,
        outcomes: ChargeOutcomes | None = None,
    ) -> None:
        self._store = store
        self._gateway = gateway
        self._clock = clock
        self._page_tokens = page_tokens
        self._outcomes = outcomes

    async def list_charges(
        self, status: ChargeStatus | None, tenant_id: str, page_size: int, page_token: str
    ) -> tuple[list[Charge], str]:
        """One page of charges, oldest first (AIP-158), of one status and one tenant when
        given."""
        if tenant_id:
            check_id("tenant_id", tenant_id)
        if not 0 <= page_size <= _PAGE_SIZE_MAX:
            raise InvalidArgument("page_size", f"must be 0 to {_PAGE_SIZE_MAX}")
        size = page_size or _PAGE_SIZE_DEFAULT
        filters = filters_fingerprint(
            status="" if status is None else str(status), tenant=tenant_id
        )
        position = await self._page_tokens.read(page_token, filters, 2)
        after = (
            None if position is None else (position_time(position[0]), position_text(position[1]))
        )
        found = await self._store.list_charges(status, tenant_id or None, after, size + 1)
        page = found[:size]
        next_token = ""
        if len(found) > size:
            last = page[-1]
            next_token = await self._page_tokens.make(
                filters, [last.created_at.isoformat(), last.charge_id]
            )
        return page, next_token

    async def resolve_charge(
        self,
        request_id: str,
        charge_id: str,
        outcome: ChargeStatus | None,
        payment_intent_id: str,
        reason: str,
    ) -> Charge:
        check_id("request_id", request_id)
        check_charge_id("charge_id", charge_id)
        if outcome not in RESOLUTIONS:
            raise InvalidArgument("outcome", "must be SUCCEEDED or FAILED")
        if payment_intent_id:
            check_id("payment_intent_id", payment_intent_id)
            if not payment_intent_id.startswith("pi_"):
                raise InvalidArgument("payment_intent_id", "must start with 'pi_'")
        check_reason("reason", reason, required=True)
        if self._gateway is None:
            raise FailedPrecondition(
                ErrorReason.STRIPE_NOT_CONFIGURED,
                "Card payments are not configured on this server (no Stripe API key).",
            )
        fingerprint = _fingerprint(charge_id, outcome, payment_intent_id, reason)
        prior = await self._store.find_request(request_id)
        if prior is not None:
            if prior.request_fingerprint != fingerprint:
                raise request_id_reused(request_id)
            return await self._charge(charge_id)
        charge = await self._charge(charge_id)
        if charge.status not in OPEN_STATUSES:
            raise _already_final(charge)
        intent_id = await self._check_with_stripe(self._gateway, charge, outcome, payment_intent_id)
        message = (
            None if outcome is ChargeStatus.SUCCEEDED else f"Resolved by an operator: {reason}"
        )
        recorded = await self._store.record_outcome(
            charge.charge_id,
            outcome,
            intent_id,
            message and message[:500],
            self._clock(),
            card_problem=False,
            only_from=OPEN_STATUSES,
            unleased=True,
        )
        after = recorded.charge
        assert after is not None
        if not recorded.moved:
            if after.status in OPEN_STATUSES:
                raise FailedPrecondition(
                    ErrorReason.CHARGE_IN_PROGRESS,
                    f"the charge worker is asking Stripe about charge {charge_id} right now; "
                    "retry in a minute",
                )
            raise _already_final(after)
        if self._outcomes is not None:
            self._outcomes.charge_recorded(after.trigger, outcome_label(outcome))
        _log.warning(
            "charge %s of tenant %s resolved by an operator as %s (request %s)",
            charge_id,
            after.tenant_id,
            outcome,
            request_id,
        )
        stored = await self._store.record_request(
            request_id,
            fingerprint,
            "resolve_charge",
            after.tenant_id,
            {"charge_id": charge_id, "reason": reason},
            self._clock(),
        )
        if stored.request_fingerprint != fingerprint:
            raise request_id_reused(request_id)
        return after

    async def _charge(self, charge_id: str) -> Charge:
        charge = await self._store.get_charge(charge_id)
        if charge is None:
            raise NotFound(ErrorReason.CHARGE_NOT_FOUND, f"there is no charge {charge_id}")
        return charge

    async def _check_with_stripe(
        self,
        gateway: PaymentGateway,
        charge: Charge,
        outcome: ChargeStatus,
        payment_intent_id: str,
    ) -> str | None:
        """The PaymentIntent that took the money (for a success); raises if Stripe says
        otherwise than `outcome`."""
        try:
            intents = await self._intents_of(gateway, charge, payment_intent_id)
        except GatewayUnavailable as error:
            failure = Unavailable(
                ErrorReason.STRIPE_UNAVAILABLE,
                "Stripe is unavailable to check the outcome; retry with the same request_id.",
            )
            failure.__cause__ = error
            raise failure from None
        named = [i for i in intents if i.payment_intent_id == payment_intent_id]
        if payment_intent_id and not named:
            raise _contradicts(f"Stripe has no PaymentIntent {payment_intent_id} for this charge")
        if outcome is ChargeStatus.SUCCEEDED:
            candidates = named or [i for i in intents if i.outcome is PaymentOutcome.SUCCEEDED]
            if len(candidates) != 1 or candidates[0].outcome is not PaymentOutcome.SUCCEEDED:
                raise _contradicts(
                    "Stripe shows no single succeeded PaymentIntent for this charge"
                    + ("" if payment_intent_id else "; name the one that took the money")
                )
            return candidates[0].payment_intent_id
        taking = [i for i in intents if i.outcome is not PaymentOutcome.DECLINED]
        if taking:
            raise _contradicts(
                f"PaymentIntent {taking[0].payment_intent_id} of this charge took the money or "
                "may still take it"
            )
        return payment_intent_id or None

    async def _intents_of(
        self, gateway: PaymentGateway, charge: Charge, payment_intent_id: str
    ) -> list[PaymentResult]:
        """The charge's PaymentIntents at Stripe, with the one named by the operator."""
        found: list[PaymentResult] = []
        if charge.stripe_customer_id is not None:
            try:
                found = await gateway.find_payments(
                    customer_id=charge.stripe_customer_id,
                    charge_id=charge.charge_id,
                    created_since=charge.created_at - FIND_SINCE_MARGIN,
                )
            except GatewayRefused:
                if not payment_intent_id:
                    raise _contradicts(
                        "Stripe cannot list this charge's PaymentIntents; name the one to check"
                    ) from None
        for known in {payment_intent_id, charge.payment_intent_id} - {"", None}:
            if known is not None and all(i.payment_intent_id != known for i in found):
                try:
                    found.append(await gateway.get_payment(known))
                except GatewayNotFound:
                    continue
        ours = []
        for intent in found:
            if intent.charge_id not in (None, charge.charge_id):
                continue  # another charge's
            if (
                intent.amount_cents is not None
                and cents_to_micros(intent.amount_cents) != charge.amount_micros
            ):
                continue
            ours.append(intent)
        return ours


def _fingerprint(charge_id: str, outcome: ChargeStatus, payment_intent_id: str, reason: str) -> str:
    canonical = json.dumps(
        {
            "operation": "resolve_charge",
            "charge_id": charge_id,
            "outcome": str(outcome),
            "payment_intent_id": payment_intent_id,
            "reason": reason,
        },
        sort_keys=True,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _already_final(charge: Charge) -> FailedPrecondition:
    return FailedPrecondition(
        ErrorReason.CHARGE_ALREADY_FINAL,
        f"charge {charge.charge_id} is {charge.status}: its outcome is known already",
    )


def _contradicts(message: str) -> FailedPrecondition:
    return FailedPrecondition(ErrorReason.CHARGE_OUTCOME_CONTRADICTS_STRIPE, message)
