"""gRPC servicer of billing.v1.AccountService: each method converts, calls the account core,
converts back."""

from __future__ import annotations

from typing import Any

import grpc

from billing.v1 import account_pb2, account_pb2_grpc, types_pb2
from billing_service.api.convert import BILLING_STATUSES, timestamp
from billing_service.api.errors import maps_errors
from billing_service.domain.errors import NotFound
from billing_service.domain.payments import (
    AutoTopUp,
    BillingProfile,
    Charge,
    ChargeStatus,
    ChargeTrigger,
)
from billing_service.payments.account import AccountCore

_TRIGGERS = {
    ChargeTrigger.AUTOMATIC: account_pb2.CHARGE_TRIGGER_AUTOMATIC,
    ChargeTrigger.ON_DEMAND: account_pb2.CHARGE_TRIGGER_ON_DEMAND,
    ChargeTrigger.MANUAL: account_pb2.CHARGE_TRIGGER_MANUAL,
}
_CHARGE_STATUSES = {
    ChargeStatus.PENDING: account_pb2.CHARGE_STATUS_PENDING,
    ChargeStatus.SUCCEEDED: account_pb2.CHARGE_STATUS_SUCCEEDED,
    ChargeStatus.FAILED: account_pb2.CHARGE_STATUS_FAILED,
    ChargeStatus.ACTION_REQUIRED: account_pb2.CHARGE_STATUS_ACTION_REQUIRED,
    ChargeStatus.REFUNDED: account_pb2.CHARGE_STATUS_REFUNDED,
    ChargeStatus.UNRESOLVED: account_pb2.CHARGE_STATUS_UNRESOLVED,
}
CHARGE_STATUSES_IN = {value: key for key, value in _CHARGE_STATUSES.items()}
# TopUpNow answers before its deadline by this much, so the reply still reaches the caller.
_DEADLINE_MARGIN_S = 1.0
_WAIT_WITHOUT_DEADLINE_S = 30.0


def charge_message(charge: Charge) -> account_pb2.Charge:
    return account_pb2.Charge(
        charge_id=charge.charge_id,
        tenant_id=charge.tenant_id,
        amount_micros=charge.amount_micros,
        trigger=_TRIGGERS[charge.trigger],
        status=_CHARGE_STATUSES[charge.status],
        payment_intent_id=charge.payment_intent_id or "",
        failure_message=charge.failure_message or "",
        refunded_micros=charge.refunded_micros,
        create_time=timestamp(charge.created_at),
        update_time=timestamp(charge.updated_at),
    )


def auto_top_up_message(settings: AutoTopUp) -> types_pb2.AutoTopUpSettings:
    return types_pb2.AutoTopUpSettings(
        enabled=settings.enabled,
        threshold_micros=settings.threshold_micros,
        amount_micros=settings.amount_micros,
        monthly_limit_micros=settings.monthly_limit_micros or 0,
    )


def profile_message(profile: BillingProfile) -> account_pb2.BillingProfile:
    card = profile.card
    return account_pb2.BillingProfile(
        tenant_id=profile.tenant_id,
        payment_method=None
        if card is None
        else types_pb2.PaymentMethod(
            payment_method_id=card.payment_method_id,
            brand=card.brand,
            last4=card.last4,
            create_time=timestamp(card.saved_at),
        ),
        billing_status=BILLING_STATUSES[profile.billing_status],
        billing_status_message=profile.billing_status_message,
        auto_top_up=auto_top_up_message(profile.auto_top_up),
        automatic_top_ups_this_month_micros=profile.automatic_top_ups_this_month_micros,
        pending_charge=None
        if profile.pending_charge is None
        else charge_message(profile.pending_charge),
        stripe_customer_id=profile.stripe_customer_id or "",
    )


def _wait_s(context: grpc.aio.ServicerContext[Any, Any]) -> float:
    left = context.time_remaining()
    if left is None:
        return _WAIT_WITHOUT_DEADLINE_S
    return max(0.0, min(left, _WAIT_WITHOUT_DEADLINE_S) - _DEADLINE_MARGIN_S)


class AccountServicer(account_pb2_grpc.AccountServiceServicer):
    def __init__(self, account: AccountCore) -> None:
        self._account = account

    @maps_errors
    async def GetBillingProfile(
        self,
        request: account_pb2.GetBillingProfileRequest,
        context: grpc.aio.ServicerContext[
            account_pb2.GetBillingProfileRequest, account_pb2.GetBillingProfileResponse
        ],
    ) -> account_pb2.GetBillingProfileResponse:
        profile = await self._account.get_billing_profile(request.tenant_id)
        return account_pb2.GetBillingProfileResponse(profile=profile_message(profile))

    @maps_errors
    async def CreateSetupIntent(
        self,
        request: account_pb2.CreateSetupIntentRequest,
        context: grpc.aio.ServicerContext[
            account_pb2.CreateSetupIntentRequest, account_pb2.CreateSetupIntentResponse
        ],
    ) -> account_pb2.CreateSetupIntentResponse:
        started = await self._account.create_setup_intent(request.request_id, request.tenant_id)
        return account_pb2.CreateSetupIntentResponse(
            setup_intent_id=started.setup_intent_id,
            client_secret=started.client_secret,
            stripe_customer_id=started.stripe_customer_id,
        )

    @maps_errors
    async def ConfirmPaymentMethod(
        self,
        request: account_pb2.ConfirmPaymentMethodRequest,
        context: grpc.aio.ServicerContext[
            account_pb2.ConfirmPaymentMethodRequest, account_pb2.ConfirmPaymentMethodResponse
        ],
    ) -> account_pb2.ConfirmPaymentMethodResponse:
        profile = await self._account.confirm_payment_method(
            request.request_id, request.tenant_id, request.setup_intent_id
        )
        return account_pb2.ConfirmPaymentMethodResponse(profile=profile_message(profile))

    @maps_errors
    async def RemovePaymentMethod(
        self,
        request: account_pb2.RemovePaymentMethodRequest,
        context: grpc.aio.ServicerContext[
            account_pb2.RemovePaymentMethodRequest, account_pb2.RemovePaymentMethodResponse
        ],
    ) -> account_pb2.RemovePaymentMethodResponse:
        profile = await self._account.remove_payment_method(request.request_id, request.tenant_id)
        return account_pb2.RemovePaymentMethodResponse(profile=profile_message(profile))

    @maps_errors
    async def UpdateAutoTopUp(
        self,
        request: account_pb2.UpdateAutoTopUpRequest,
        context: grpc.aio.ServicerContext[
            account_pb2.UpdateAutoTopUpRequest, account_pb2.UpdateAutoTopUpResponse
        ],
    ) -> account_pb2.UpdateAutoTopUpResponse:
        settings = await self._account.update_auto_top_up(
            request.request_id,
            request.tenant_id,
            request.enabled if request.HasField("enabled") else None,
            request.threshold_micros if request.HasField("threshold_micros") else None,
            request.amount_micros if request.HasField("amount_micros") else None,
            request.monthly_limit_micros if request.HasField("monthly_limit_micros") else None,
        )
        return account_pb2.UpdateAutoTopUpResponse(auto_top_up=auto_top_up_message(settings))

    @maps_errors
    async def TopUpNow(
        self,
        request: account_pb2.TopUpNowRequest,
        context: grpc.aio.ServicerContext[
            account_pb2.TopUpNowRequest, account_pb2.TopUpNowResponse
        ],
    ) -> account_pb2.TopUpNowResponse:
        charge = await self._account.top_up_now(
            request.request_id, request.tenant_id, request.amount_micros, _wait_s(context)
        )
        return account_pb2.TopUpNowResponse(charge=charge_message(charge))

    @maps_errors
    async def GetCharge(
        self,
        request: account_pb2.GetChargeRequest,
        context: grpc.aio.ServicerContext[
            account_pb2.GetChargeRequest, account_pb2.GetChargeResponse
        ],
    ) -> account_pb2.GetChargeResponse:
        charge = await self._account.get_charge(request.tenant_id, request.charge_id)
        return account_pb2.GetChargeResponse(charge=charge_message(charge))


class BillingProfileMessages:
    """The payments side's billing profiles as the dashboard shows them (its BillingProfiles)."""

    def __init__(self, account: AccountCore) -> None:
        self._account = account

    async def billing_profile(self, tenant_id: str) -> account_pb2.BillingProfile | None:
        try:
            return profile_message(await self._account.get_billing_profile(tenant_id))
        except NotFound:
            return None
