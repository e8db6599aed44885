"""gRPC servicers of billing.v1: each method converts, calls the core, converts back."""

from __future__ import annotations

from typing import Any

import grpc

from billing.v1 import account_pb2, admin_pb2, admin_pb2_grpc, billing_pb2, billing_pb2_grpc
from billing_service.api import convert
from billing_service.api.account_servicer import CHARGE_STATUSES_IN, charge_message
from billing_service.api.errors import maps_errors
from billing_service.core import BillingCore
from billing_service.domain.errors import InvalidArgument
from billing_service.domain.payments import ChargeStatus
from billing_service.open_holds import OpenHoldListing
from billing_service.payments.account import AccountCore
from billing_service.payments.resolution import ChargeResolution

_RESOLUTIONS = {
    admin_pb2.CHARGE_RESOLUTION_SUCCEEDED: ChargeStatus.SUCCEEDED,
    admin_pb2.CHARGE_RESOLUTION_FAILED: ChargeStatus.FAILED,
}


class BillingServicer(billing_pb2_grpc.BillingServiceServicer):
    def __init__(self, core: BillingCore) -> None:
        self._core = core

    @maps_errors
    async def CheckAccess(
        self,
        request: billing_pb2.CheckAccessRequest,
        context: grpc.aio.ServicerContext[
            billing_pb2.CheckAccessRequest, billing_pb2.CheckAccessResponse
        ],
    ) -> billing_pb2.CheckAccessResponse:
        decision = await self._core.check_access(convert.check_access(request))
        return billing_pb2.CheckAccessResponse(decision=convert.decision(decision))

    @maps_errors
    async def ReserveCredit(
        self,
        request: billing_pb2.ReserveCreditRequest,
        context: grpc.aio.ServicerContext[
            billing_pb2.ReserveCreditRequest, billing_pb2.ReserveCreditResponse
        ],
    ) -> billing_pb2.ReserveCreditResponse:
        result = await self._core.reserve(convert.reserve(request), _top_up_wait_s(context))
        return billing_pb2.ReserveCreditResponse(
            decision=convert.decision(result.decision),
            reservation=None if result.hold is None else convert.reservation(result.hold),
        )

    @maps_errors
    async def Commit(
        self,
        request: billing_pb2.CommitRequest,
        context: grpc.aio.ServicerContext[billing_pb2.CommitRequest, billing_pb2.CommitResponse],
    ) -> billing_pb2.CommitResponse:
        return convert.commit_response(await self._core.commit(convert.commit(request)))

    @maps_errors
    async def Refund(
        self,
        request: billing_pb2.RefundRequest,
        context: grpc.aio.ServicerContext[billing_pb2.RefundRequest, billing_pb2.RefundResponse],
    ) -> billing_pb2.RefundResponse:
        return convert.refund_response(await self._core.refund(convert.refund(request)))

    @maps_errors
    async def Release(
        self,
        request: billing_pb2.ReleaseRequest,
        context: grpc.aio.ServicerContext[billing_pb2.ReleaseRequest, billing_pb2.ReleaseResponse],
    ) -> billing_pb2.ReleaseResponse:
        return convert.release_response(await self._core.release(convert.release(request)))

    @maps_errors
    async def ExtendHold(
        self,
        request: billing_pb2.ExtendHoldRequest,
        context: grpc.aio.ServicerContext[
            billing_pb2.ExtendHoldRequest, billing_pb2.ExtendHoldResponse
        ],
    ) -> billing_pb2.ExtendHoldResponse:
        result = await self._core.extend_hold(convert.extend_hold(request))
        return convert.extend_hold_response(result)


# A reservation that waits for a card top-up answers this long before its deadline.
_DEADLINE_MARGIN_S = 0.5


def _top_up_wait_s(context: grpc.aio.ServicerContext[Any, Any]) -> float:
    """Only a call with a deadline waits for a top-up, and never past it."""
    left = context.time_remaining()
    return 0.0 if left is None else max(0.0, left - _DEADLINE_MARGIN_S)


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        core: BillingCore,
        account: AccountCore | None = None,
        charges: ChargeResolution | None = None,
        open_holds: OpenHoldListing | None = None,
    ) -> None:
        self._core = core
        self._account = account
        self._charges = charges
        self._open_holds = open_holds

    @maps_errors
    async def ListOpenHolds(
        self,
        request: admin_pb2.ListOpenHoldsRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.ListOpenHoldsRequest, admin_pb2.ListOpenHoldsResponse
        ],
    ) -> admin_pb2.ListOpenHoldsResponse:
        if self._open_holds is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "ListOpenHolds is not wired")
        assert self._open_holds is not None
        found, next_token = await self._open_holds.list_open_holds(
            request.tenant_id,
            request.user_id,
            request.api_key_id,
            request.page_size,
            request.page_token,
        )
        return admin_pb2.ListOpenHoldsResponse(
            holds=[
                admin_pb2.OpenHold(
                    hold_id=hold.hold_id,
                    user_id=hold.user_id,
                    api_key_id=hold.api_key_id,
                    model=hold.model,
                    amount_micros=hold.amount_micros,
                    create_time=convert.timestamp(hold.created_at),
                    expire_time=convert.timestamp(hold.expires_at),
                )
                for hold in found
            ],
            next_page_token=next_token,
        )

    @maps_errors
    async def ListCharges(
        self,
        request: admin_pb2.ListChargesRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.ListChargesRequest, admin_pb2.ListChargesResponse
        ],
    ) -> admin_pb2.ListChargesResponse:
        if self._charges is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "ListCharges is not wired")
        assert self._charges is not None
        status = None
        if request.status != account_pb2.CHARGE_STATUS_UNSPECIFIED:
            status = CHARGE_STATUSES_IN.get(request.status)
            if status is None:
                raise InvalidArgument("status", f"{request.status} is not a ChargeStatus")
        charges, next_token = await self._charges.list_charges(
            status, request.tenant_id, request.page_size, request.page_token
        )
        return admin_pb2.ListChargesResponse(
            charges=[charge_message(charge) for charge in charges], next_page_token=next_token
        )

    @maps_errors
    async def ResolveCharge(
        self,
        request: admin_pb2.ResolveChargeRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.ResolveChargeRequest, admin_pb2.ResolveChargeResponse
        ],
    ) -> admin_pb2.ResolveChargeResponse:
        if self._charges is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "ResolveCharge is not wired")
        assert self._charges is not None
        charge = await self._charges.resolve_charge(
            request.request_id,
            request.charge_id,
            _RESOLUTIONS.get(request.outcome),
            request.payment_intent_id,
            request.reason,
        )
        return admin_pb2.ResolveChargeResponse(charge=charge_message(charge))

    @maps_errors
    async def ListTenants(
        self,
        request: admin_pb2.ListTenantsRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.ListTenantsRequest, admin_pb2.ListTenantsResponse
        ],
    ) -> admin_pb2.ListTenantsResponse:
        if self._account is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "ListTenants is not wired")
        assert self._account is not None
        status = convert.billing_status_filter(request.billing_status)
        accounts, next_token = await self._account.list_tenants(
            status, request.page_size, request.page_token
        )
        return admin_pb2.ListTenantsResponse(
            tenants=[convert.tenant(account) for account in accounts],
            next_page_token=next_token,
        )

    @maps_errors
    async def CreateTenant(
        self,
        request: admin_pb2.CreateTenantRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.CreateTenantRequest, admin_pb2.CreateTenantResponse
        ],
    ) -> admin_pb2.CreateTenantResponse:
        account = await self._core.create_tenant(convert.create_tenant(request))
        return admin_pb2.CreateTenantResponse(tenant=convert.tenant(account))

    @maps_errors
    async def UpdateTenant(
        self,
        request: admin_pb2.UpdateTenantRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.UpdateTenantRequest, admin_pb2.UpdateTenantResponse
        ],
    ) -> admin_pb2.UpdateTenantResponse:
        account = await self._core.update_tenant(convert.update_tenant(request))
        return admin_pb2.UpdateTenantResponse(tenant=convert.tenant(account))

    @maps_errors
    async def GetTenant(
        self,
        request: admin_pb2.GetTenantRequest,
        context: grpc.aio.ServicerContext[admin_pb2.GetTenantRequest, admin_pb2.GetTenantResponse],
    ) -> admin_pb2.GetTenantResponse:
        account = await self._core.get_tenant(request.tenant_id)
        return admin_pb2.GetTenantResponse(tenant=convert.tenant(account))

    @maps_errors
    async def GrantCredit(
        self,
        request: admin_pb2.GrantCreditRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.GrantCreditRequest, admin_pb2.GrantCreditResponse
        ],
    ) -> admin_pb2.GrantCreditResponse:
        outcome = await self._core.grant_credit(convert.grant_credit(request))
        return admin_pb2.GrantCreditResponse(
            ledger_entry_id=outcome.entry_id, balance=convert.balance(outcome.balance)
        )
