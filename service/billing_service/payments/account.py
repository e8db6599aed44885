"""The AccountService use cases: saved cards, automatic top-up settings, top-ups on demand.

Every mutating call is idempotent by request_id: its first answer is stored (account_requests)
and replayed; Stripe creates carry idempotency keys derived from the request, so a retry after
a lost answer creates nothing twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from billing_service.domain.commands import check_id
from billing_service.domain.errors import (
    ErrorReason,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    request_id_reused,
)
from billing_service.domain.model import Account
from billing_service.domain.page_tokens import PageTokens, filters_fingerprint, position_text
from billing_service.domain.payments import (
    AutoTopUp,
    BillingProfile,
    BillingStatus,
    Card,
    Charge,
    ChargeStatus,
    ChargeTrigger,
    check_charge_id,
    check_monthly_limit,
    check_threshold,
    check_top_up_amount,
)
from billing_service.payments.gateway import (
    GatewayNotFound,
    GatewayRefused,
    GatewayUnavailable,
    PaymentGateway,
)
from billing_service.payments.outbox import ChargeWorker, new_charge_id
from billing_service.storage.payments_store import PaymentsStore

Clock = Callable[[], datetime]

_PAGE_SIZE_DEFAULT = 100
_PAGE_SIZE_MAX = 1000


def _fingerprint(operation: str, **fields: Any) -> str:
    canonical = json.dumps({"operation": operation, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def stripe_not_configured() -> FailedPrecondition:
    return FailedPrecondition(
        ErrorReason.STRIPE_NOT_CONFIGURED,
        "Card payments are not configured on this server (no Stripe API key).",
    )


def _stripe_unavailable(error: Exception) -> Unavailable:
    failure = Unavailable(
        ErrorReason.STRIPE_UNAVAILABLE, "Stripe is unavailable; retry with the same request_id."
    )
    failure.__cause__ = error
    return failure


@dataclass(frozen=True, slots=True)
class SetupIntentStarted:
    setup_intent_id: str
    client_secret: str
    stripe_customer_id: str


@dataclass(frozen=True, slots=True)
class Payments:
    """The Stripe side, present only when a key is configured."""

    gateway: PaymentGateway
    worker: ChargeWorker


class AccountCore:
    def __init__(
        self,
        store: PaymentsStore,
        payments: Payments | None,
        clock: Clock,
        page_tokens: PageTokens,
    ) -> None:
        self._store = store
        self._payments = payments
        self._clock = clock
        self._page_tokens = page_tokens

    @property
    def store(self) -> PaymentsStore:
        return self._store

    @property
    def gateway(self) -> PaymentGateway:
        return self._stripe().gateway

    def _stripe(self) -> Payments:
        if self._payments is None:
            raise stripe_not_configured()
        return self._payments

    async def get_billing_profile(self, tenant_id: str) -> BillingProfile:
        check_id("tenant_id", tenant_id)
        return await self._profile(tenant_id)

    async def create_setup_intent(self, request_id: str, tenant_id: str) -> SetupIntentStarted:
        check_id("request_id", request_id)
        check_id("tenant_id", tenant_id)
        payments = self._stripe()
        fingerprint = _fingerprint("create_setup_intent", tenant_id=tenant_id)
        prior = await self._replay(request_id, fingerprint)
        try:
            if prior is not None:
                # The client secret is not stored: it is read back from Stripe.
                secret = await payments.gateway.get_client_secret(prior["setup_intent_id"])
                return SetupIntentStarted(prior["setup_intent_id"], secret, prior["customer_id"])
            profile = await self._profile(tenant_id)
            customer_id = profile.stripe_customer_id
            if customer_id is None:
                created = await payments.gateway.create_customer(
                    tenant_id, idempotency_key=f"customer-{tenant_id}"
                )
                customer_id = await self._store.set_customer(tenant_id, created, self._clock())
            intent = await payments.gateway.create_setup_intent(
                customer_id, idempotency_key=f"setup-intent-{request_id}"
            )
        except GatewayUnavailable as error:
            raise _stripe_unavailable(error) from None
        await self._store.record_setup_intent(intent.setup_intent_id, tenant_id, self._clock())
        stored = await self._store.record_request(
            request_id,
            fingerprint,
            "create_setup_intent",
            tenant_id,
            {"setup_intent_id": intent.setup_intent_id, "customer_id": customer_id},
            self._clock(),
        )
        if stored.request_fingerprint != fingerprint:
            raise request_id_reused(request_id)
        if stored.result["setup_intent_id"] != intent.setup_intent_id:
            return await self.create_setup_intent(request_id, tenant_id)
        return SetupIntentStarted(intent.setup_intent_id, intent.client_secret, customer_id)

    async def confirm_payment_method(
        self, request_id: str, tenant_id: str, setup_intent_id: str
    ) -> BillingProfile:
        check_id("request_id", request_id)
        check_id("tenant_id", tenant_id)
        check_id("setup_intent_id", setup_intent_id)
        if not setup_intent_id.startswith("seti_"):
            raise InvalidArgument("setup_intent_id", "must start with 'seti_'")
        self._stripe()
        fingerprint = _fingerprint(
            "confirm_payment_method", tenant_id=tenant_id, setup_intent_id=setup_intent_id
        )
        if await self._replay(request_id, fingerprint) is not None:
            return await self._profile(tenant_id)
        profile = await self._profile(tenant_id)
        await self.save_card_of_setup_intent(profile, setup_intent_id)
        await self._record(request_id, fingerprint, "confirm_payment_method", tenant_id)
        return await self._profile(tenant_id)

    async def save_card_of_setup_intent(
        self, profile: BillingProfile, setup_intent_id: str, *, only_if_newer: bool = False
    ) -> None:
        """Checks with Stripe that the SetupIntent succeeded for this tenant's customer, then
        makes its card the default and stores it. only_if_newer: not if a newer card fact
        (by when we created the SetupIntent) has been stored meanwhile."""
        gateway = self._stripe().gateway
        try:
            try:
                intent = await gateway.get_setup_intent(setup_intent_id)
            except GatewayNotFound:
                raise NotFound(
                    ErrorReason.SETUP_INTENT_NOT_FOUND,
                    f"Stripe has no SetupIntent {setup_intent_id}",
                ) from None
            customer_id = profile.stripe_customer_id
            if customer_id is None or intent.customer_id != customer_id:
                raise FailedPrecondition(
                    ErrorReason.SETUP_INTENT_OF_ANOTHER_CUSTOMER,
                    f"SetupIntent {setup_intent_id} does not belong to tenant "
                    f"{profile.tenant_id}'s Stripe customer",
                )
            if intent.status != "succeeded" or intent.payment_method_id is None:
                raise FailedPrecondition(
                    ErrorReason.SETUP_INTENT_NOT_SUCCEEDED,
                    f"SetupIntent {setup_intent_id} is {intent.status}, not succeeded: "
                    "confirm it with Stripe.js first",
                )
            card = await gateway.get_card(intent.payment_method_id)
            if card.customer_id != customer_id:
                if card.customer_id is not None:
                    raise FailedPrecondition(
                        ErrorReason.SETUP_INTENT_OF_ANOTHER_CUSTOMER,
                        "the SetupIntent's card belongs to another customer",
                    )
                # Confirming a SetupIntent does not always attach its card (localstripe).
                await gateway.attach_card(card.payment_method_id, customer_id)
            await gateway.set_default_card(customer_id, card.payment_method_id)
        except GatewayUnavailable as error:
            raise _stripe_unavailable(error) from None
        except GatewayRefused as error:
            raise FailedPrecondition(ErrorReason.CARD_REFUSED, str(error)) from None
        created = await self._store.setup_intent_created(setup_intent_id)
        await self._store.save_card(
            profile.tenant_id,
            Card(card.payment_method_id, card.brand, card.last4, None),
            self._clock(),
            fact_at=None if created is None else created[1],
            only_if_newer=only_if_newer,
        )

    async def remove_payment_method(self, request_id: str, tenant_id: str) -> BillingProfile:
        check_id("request_id", request_id)
        check_id("tenant_id", tenant_id)
        gateway = self._stripe().gateway
        fingerprint = _fingerprint("remove_payment_method", tenant_id=tenant_id)
        if await self._replay(request_id, fingerprint) is not None:
            return await self._profile(tenant_id)
        profile = await self._profile(tenant_id)
        if profile.card is None:
            raise FailedPrecondition(
                ErrorReason.NO_PAYMENT_METHOD, f"tenant {tenant_id} has no card on file"
            )
        try:
            await gateway.detach_card(profile.card.payment_method_id)
        except GatewayUnavailable as error:
            raise _stripe_unavailable(error) from None
        await self._store.forget_card(tenant_id, profile.card.payment_method_id, self._clock())
        await self._record(request_id, fingerprint, "remove_payment_method", tenant_id)
        return await self._profile(tenant_id)

    async def update_auto_top_up(
        self,
        request_id: str,
        tenant_id: str,
        enabled: bool | None,
        threshold_micros: int | None,
        amount_micros: int | None,
        monthly_limit_micros: int | None = None,
    ) -> AutoTopUp:
        check_id("request_id", request_id)
        check_id("tenant_id", tenant_id)
        if threshold_micros is not None:
            check_threshold("threshold_micros", threshold_micros)
        if amount_micros is not None:
            check_top_up_amount("amount_micros", amount_micros)
        if monthly_limit_micros is not None:
            check_monthly_limit("monthly_limit_micros", monthly_limit_micros)
        self._stripe()
        ceiling = (
            {} if monthly_limit_micros is None else {"monthly_limit_micros": monthly_limit_micros}
        )
        fingerprint = _fingerprint(
            "update_auto_top_up",
            tenant_id=tenant_id,
            enabled=enabled,
            threshold_micros=threshold_micros,
            amount_micros=amount_micros,
            # Absent when unset, so fingerprints stored before the ceiling existed still match.
            **ceiling,
        )
        prior = await self._replay(request_id, fingerprint)
        if prior is not None:
            return AutoTopUp(**prior)
        profile = await self._store.update_auto_top_up(
            tenant_id,
            enabled,
            threshold_micros,
            amount_micros,
            self._clock(),
            monthly_limit_micros=monthly_limit_micros,
        )
        if profile is None:
            raise _tenant_not_found(tenant_id)
        settings = profile.auto_top_up
        stored = await self._store.record_request(
            request_id,
            fingerprint,
            "update_auto_top_up",
            tenant_id,
            {
                "enabled": settings.enabled,
                "threshold_micros": settings.threshold_micros,
                "amount_micros": settings.amount_micros,
                "monthly_limit_micros": settings.monthly_limit_micros,
            },
            self._clock(),
        )
        if stored.request_fingerprint != fingerprint:
            raise request_id_reused(request_id)
        if self._payments is not None:
            self._payments.worker.nudge()
        return AutoTopUp(**stored.result)

    async def top_up_now(
        self, request_id: str, tenant_id: str, amount_micros: int, wait_s: float
    ) -> Charge:
        check_id("request_id", request_id)
        check_id("tenant_id", tenant_id)
        check_top_up_amount("amount_micros", amount_micros)
        payments = self._stripe()
        profile = await self._profile(tenant_id)
        now = self._clock()
        fingerprint = _fingerprint("top_up_now", tenant_id=tenant_id, amount_micros=amount_micros)
        wanted = Charge(
            charge_id=new_charge_id(),
            tenant_id=tenant_id,
            amount_micros=amount_micros,
            trigger=ChargeTrigger.MANUAL,
            status=ChargeStatus.PENDING,
            payment_intent_id=None,
            failure_message=None,
            refunded_micros=0,
            created_at=now,
            updated_at=now,
            request_id=request_id,
            request_fingerprint=fingerprint,
        )
        prior = await self._store.get_charge_by_request(request_id)
        if prior is None:
            if profile.card is not None:
                prior = await self._store.enqueue_charge(wanted)
            if prior is None:
                raise FailedPrecondition(
                    ErrorReason.NO_PAYMENT_METHOD, f"tenant {tenant_id} has no card on file"
                )
            if prior.request_id != request_id:
                raise FailedPrecondition(
                    ErrorReason.CHARGE_IN_PROGRESS,
                    f"charge {prior.charge_id} of tenant {tenant_id} is still in progress; "
                    "retry once it has finished",
                )
        if prior.request_fingerprint != fingerprint:
            raise request_id_reused(request_id)
        payments.worker.nudge()
        settled = await payments.worker.wait_until_settled(prior.charge_id, wait_s)
        return settled or prior

    async def get_charge(self, tenant_id: str, charge_id: str) -> Charge:
        check_id("tenant_id", tenant_id)
        check_id("charge_id", charge_id)
        check_charge_id("charge_id", charge_id)
        self._stripe()
        await self._profile(tenant_id)
        charge = await self._store.get_charge(charge_id)
        if charge is None or charge.tenant_id != tenant_id:
            raise NotFound(
                ErrorReason.CHARGE_NOT_FOUND, f"tenant {tenant_id} has no charge {charge_id}"
            )
        return charge

    async def list_tenants(
        self, billing_status: BillingStatus | None, page_size: int, page_token: str
    ) -> tuple[list[Account], str]:
        """One page of tenants in tenant_id order (AIP-158); the token names the last tenant
        returned and the filter it was made for."""
        if not 0 <= page_size <= _PAGE_SIZE_MAX:
            raise InvalidArgument("page_size", f"must be 0 to {_PAGE_SIZE_MAX}")
        size = page_size or _PAGE_SIZE_DEFAULT
        status = "" if billing_status is None else str(billing_status)
        filters = filters_fingerprint(billing_status=status)
        position = await self._page_tokens.read(page_token, filters, 1)
        after = "" if position is None else position_text(position[0])
        accounts = await self._store.list_accounts(billing_status, after, size + 1)
        page = accounts[:size]
        next_token = ""
        if len(accounts) > size:
            next_token = await self._page_tokens.make(filters, [page[-1].tenant_id])
        return page, next_token

    async def _profile(self, tenant_id: str) -> BillingProfile:
        profile = await self._store.get_profile(tenant_id, self._clock())
        if profile is None:
            raise _tenant_not_found(tenant_id)
        return profile

    async def _replay(self, request_id: str, fingerprint: str) -> dict[str, Any] | None:
        prior = await self._store.find_request(request_id)
        if prior is None:
            return None
        if prior.request_fingerprint != fingerprint:
            raise request_id_reused(request_id)
        return prior.result

    async def _record(
        self, request_id: str, fingerprint: str, operation: str, tenant_id: str
    ) -> None:
        stored = await self._store.record_request(
            request_id, fingerprint, operation, tenant_id, {}, self._clock()
        )
        if stored.request_fingerprint != fingerprint:
            raise request_id_reused(request_id)


def _tenant_not_found(tenant_id: str) -> NotFound:
    return NotFound(ErrorReason.TENANT_NOT_FOUND, f"tenant {tenant_id} does not exist")
