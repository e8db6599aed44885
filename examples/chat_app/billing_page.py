"""GET /billing/{tenant_id}: the page a tenant admin opens under "Billing", fed only by the
Python client: card on file or a form to add one (Stripe.js confirms a SetupIntent from
AccountService), available credit against the limit, this month's usage by model and by user,
the latest usage records, automatic top-up settings, and the billing status with what to do.

The example has no login: a real product takes the tenant from the signed-in admin's session
(and checks that the admin may manage its billing) instead of from the URL and the request
body. The actions take JSON bodies only, which a form on another site cannot send. The browser
only ever sees the SetupIntent's client secret; card numbers go from the browser to Stripe,
never through this app or the billing service.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import jinja2
from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from billing.client import (
    AlreadyExists,
    BillingClient,
    BillingError,
    BillingUnavailable,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    new_request_id,
)
from billing.ctl.money import format_dollars, parse_dollars
from billing.v1 import account_pb2, types_pb2, usage_pb2
from examples.chat_app import billing_view
from examples.chat_app.settings import ChatSettings

logger = logging.getLogger("chat_app.billing_page")

RECENT_RECORDS = 20

_HERE = Path(__file__).parent
_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(_HERE / "templates"),
    autoescape=True,  # tenant and user ids are the callers' text: every value is escaped
    undefined=jinja2.StrictUndefined,
)
_templates.filters["dollars"] = format_dollars
_templates.filters["utc"] = billing_view.utc_time
_templates.filters["count"] = lambda n: f"{n:,}"


class TenantRequest(BaseModel):
    tenant_id: str = Field(min_length=1, max_length=128)


class SaveCardRequest(TenantRequest):
    setup_intent_id: str = Field(min_length=1, max_length=255)


class AutoTopUpForm(TenantRequest):
    """Amounts as the admin typed them, in dollars (parsed exactly, at most 6 decimals)."""

    enabled: bool
    threshold: str = Field(max_length=32)
    amount: str = Field(max_length=32)
    monthly_limit: str = Field(max_length=32)


@dataclass(frozen=True)
class Page:
    tenant_id: str
    summary: usage_pb2.GetUsageSummaryResponse
    records: list[types_pb2.UsageRecord]
    settings: ChatSettings

    def render(self) -> str:
        tenant = self.summary.tenant
        profile = self.summary.billing_profile if self.summary.HasField("billing_profile") else None
        can_add_card = bool(self.settings.stripe_publishable_key)
        return _templates.get_template("billing.html").render(
            tenant_id=self.tenant_id,
            tenant=tenant,
            balance=tenant.balance,
            profile=profile,
            card=profile.payment_method
            if profile is not None and profile.HasField("payment_method")
            else None,
            standing=billing_view.standing(tenant, profile, can_add_card=can_add_card),
            bar=billing_view.credit_bar(tenant.balance, self.summary.limit_used_basis_points),
            month=billing_view.month_label(self.summary.start_time),
            totals=self.summary.totals,
            totals_tokens=billing_view.totals_tokens(self.summary.totals),
            by_model=self.summary.by_model,
            by_user=self.summary.by_user,
            by_user_truncated=self.summary.by_user_truncated,
            records=self.records,
            source=billing_view.payment_source_label,
            stripe_publishable_key=self.settings.stripe_publishable_key,
            stripe_js_url=self.settings.stripe_js_url,
        )


def install_billing_page(app: FastAPI, settings: ChatSettings) -> BillingClient:
    """Adds the page, its three JSON actions and its static files to `app`; returns the page's
    client (product-backend role), for the app to close."""
    client = BillingClient(
        settings.billing_target,
        token=settings.billing_page_token or settings.billing_token,
        timeout_s=settings.billing_timeout_s,
        max_attempts=settings.billing_attempts,
    )
    app.include_router(_router(client, settings))
    app.mount("/billing-static", StaticFiles(directory=_HERE / "static"), name="billing-static")
    return client


def _router(client: BillingClient, settings: ChatSettings) -> APIRouter:
    router = APIRouter()

    # Plain `def`s: FastAPI runs them in worker threads, where the blocking client belongs.
    @router.post("/billing/setup-intent")
    def create_setup_intent(body: TenantRequest) -> JSONResponse:
        """Step 1 of saving a card: a SetupIntent whose client secret Stripe.js confirms."""
        rid = new_request_id()
        request = account_pb2.CreateSetupIntentRequest(request_id=rid, tenant_id=body.tenant_id)
        try:
            started = client.call(
                client.account.CreateSetupIntent, request, name="CreateSetupIntent", request_id=rid
            )
        except BillingError as error:
            return _error_json(error)
        return JSONResponse(
            {"setup_intent_id": started.setup_intent_id, "client_secret": started.client_secret}
        )

    @router.post("/billing/card")
    def save_card(body: SaveCardRequest) -> JSONResponse:
        """Step 2, once Stripe.js confirmed: the service checks the SetupIntent with Stripe
        (succeeded, this tenant's customer) and keeps the card's brand and last 4."""
        rid = new_request_id()
        request = account_pb2.ConfirmPaymentMethodRequest(
            request_id=rid, tenant_id=body.tenant_id, setup_intent_id=body.setup_intent_id
        )
        try:
            saved = client.call(
                client.account.ConfirmPaymentMethod,
                request,
                name="ConfirmPaymentMethod",
                request_id=rid,
            )
        except BillingError as error:
            return _error_json(error)
        card = saved.profile.payment_method
        return JSONResponse({"brand": card.brand, "last4": card.last4})

    @router.post("/billing/auto-top-up")
    def update_auto_top_up(body: AutoTopUpForm) -> JSONResponse:
        amounts: dict[str, int] = {}
        for field in ("threshold", "amount", "monthly_limit"):
            try:
                amounts[field] = parse_dollars(getattr(body, field))
            except ValueError:
                message = "Enter an amount in dollars, e.g. 20 or 12.50."
                return _json_error(400, "INVALID_AMOUNT", message, field)
        rid = new_request_id()
        request = account_pb2.UpdateAutoTopUpRequest(
            request_id=rid,
            tenant_id=body.tenant_id,
            enabled=body.enabled,
            threshold_micros=amounts["threshold"],
            amount_micros=amounts["amount"],
            monthly_limit_micros=amounts["monthly_limit"],
        )
        try:
            client.call(
                client.account.UpdateAutoTopUp, request, name="UpdateAutoTopUp", request_id=rid
            )
        except BillingError as error:
            return _error_json(error)
        return JSONResponse({"updated": True})

    @router.get("/billing/{tenant_id:path}", response_class=HTMLResponse)
    def billing_page(tenant_id: str) -> HTMLResponse:
        if not 1 <= len(tenant_id) <= 128:
            return _error_page(404, "No such tenant", "A tenant id has 1 to 128 characters.")
        try:
            summary = client.call(
                client.usage.GetUsageSummary,
                usage_pb2.GetUsageSummaryRequest(tenant_id=tenant_id),
                name="GetUsageSummary",
            )
            records = client.call(
                client.usage.ListUsageRecords,
                usage_pb2.ListUsageRecordsRequest(tenant_id=tenant_id, page_size=RECENT_RECORDS),
                name="ListUsageRecords",
            ).usage_records
        except NotFound:
            return _error_page(404, "No such tenant", f"The billing service knows no {tenant_id}.")
        except BillingUnavailable:
            return _error_page(503, "Billing is unavailable", "Try again in a few seconds.")
        except BillingError as error:
            logger.error("billing page of %s: %s", tenant_id, error)
            return _error_page(502, "Billing refused the page", "See the app's log.")
        html = Page(tenant_id, summary, list(records), settings).render()
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    return router


def _error_page(status: int, title: str, detail: str) -> HTMLResponse:
    html = _templates.get_template("billing_error.html").render(title=title, detail=detail)
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})


_HTTP_STATUS: list[tuple[type[BillingError], int]] = [
    (InvalidArgument, 400),
    (NotFound, 404),
    (AlreadyExists, 409),
    (FailedPrecondition, 409),
    (BillingUnavailable, 503),
]


def _error_json(error: BillingError) -> JSONResponse:
    """A refused call as the browser's script reads it: the service's sentence (written for
    people) and its stable reason. A transport failure's text or an unexpected refusal
    (credentials, roles: the app's problem with billing, 502) stays in the app's log."""
    status = next((s for kind, s in _HTTP_STATUS if isinstance(error, kind)), 502)
    field = error.field_violations[0].field if error.field_violations else ""
    reason = error.reason or error.code.name
    message = error.message
    if isinstance(error, BillingUnavailable):
        # A change may or may not have been made: the page shows what the service has.
        message = "Billing did not answer in time. Reload the page to see what was saved."
    elif status == 502:
        logger.error("billing refused a page action: %s", error)
        message = "The billing service refused the app; see its log."
    return _json_error(status, reason, message, field)


def _json_error(status: int, reason: str, message: str, field: str = "") -> JSONResponse:
    body = {"error": {"reason": reason, "message": message, "field": field}}
    return JSONResponse(body, status_code=status)
