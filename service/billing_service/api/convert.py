"""Messages <-> domain values. Pure translation: no rule; only what protobuf lets through but
no request may carry (undefined enum numbers, out-of-range durations) is refused, by api.fields."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from billing.v1 import admin_pb2, billing_pb2, budget_pb2, types_pb2
from billing_service.api.fields import optional_duration, optional_enum
from billing_service.core import ExtendResult
from billing_service.domain import budgets, commands
from billing_service.domain.ledger import EntryKind
from billing_service.domain.model import (
    Account,
    Balance,
    DenialReason,
    Hold,
    HoldStatus,
    PaymentSource,
    TenantStatus,
    UsageRecord,
)
from billing_service.domain.outcomes import CommitOutcome, RefundOutcome, ReleaseOutcome
from billing_service.domain.payments import BillingStatus
from billing_service.domain.policy import Decision
from billing_service.domain.pricing import ModelBilling, TokenUsage

_DENIAL_REASONS = {
    None: types_pb2.DENIAL_REASON_UNSPECIFIED,
    DenialReason.PAYMENT_METHOD_REQUIRED: types_pb2.DENIAL_REASON_PAYMENT_METHOD_REQUIRED,
    DenialReason.CREDIT_LIMIT_REACHED: types_pb2.DENIAL_REASON_CREDIT_LIMIT_REACHED,
    DenialReason.ACCOUNT_SUSPENDED: types_pb2.DENIAL_REASON_ACCOUNT_SUSPENDED,
    DenialReason.MODEL_NOT_OFFERED: types_pb2.DENIAL_REASON_MODEL_NOT_OFFERED,
    DenialReason.PAYMENT_FAILED: types_pb2.DENIAL_REASON_PAYMENT_FAILED,
    DenialReason.PAYMENT_ACTION_REQUIRED: types_pb2.DENIAL_REASON_PAYMENT_ACTION_REQUIRED,
    DenialReason.PAYMENT_DISPUTED: types_pb2.DENIAL_REASON_PAYMENT_DISPUTED,
    DenialReason.TOP_UP_LIMIT_REACHED: types_pb2.DENIAL_REASON_TOP_UP_LIMIT_REACHED,
    DenialReason.USER_BUDGET_EXHAUSTED: types_pb2.DENIAL_REASON_USER_BUDGET_EXHAUSTED,
    DenialReason.API_KEY_BUDGET_EXHAUSTED: types_pb2.DENIAL_REASON_API_KEY_BUDGET_EXHAUSTED,
}
_BUDGET_SCOPES = {
    budgets.BudgetScope.USER: types_pb2.BUDGET_SCOPE_USER,
    budgets.BudgetScope.API_KEY: types_pb2.BUDGET_SCOPE_API_KEY,
}
_BUDGET_SCOPES_IN = {value: key for key, value in _BUDGET_SCOPES.items()}
_BUDGET_PERIODS = {
    budgets.BudgetPeriod.DAY: types_pb2.BUDGET_PERIOD_DAY,
    budgets.BudgetPeriod.WEEK: types_pb2.BUDGET_PERIOD_WEEK,
    budgets.BudgetPeriod.MONTH: types_pb2.BUDGET_PERIOD_MONTH,
    budgets.BudgetPeriod.NONE: types_pb2.BUDGET_PERIOD_NONE,
}
_BUDGET_PERIODS_IN = {value: key for key, value in _BUDGET_PERIODS.items()}
BILLING_STATUSES = {
    BillingStatus.GOOD_STANDING: types_pb2.BILLING_STATUS_GOOD_STANDING,
    BillingStatus.PAYMENT_FAILED: types_pb2.BILLING_STATUS_PAYMENT_FAILED,
    BillingStatus.ACTION_REQUIRED: types_pb2.BILLING_STATUS_ACTION_REQUIRED,
    BillingStatus.DISPUTED: types_pb2.BILLING_STATUS_DISPUTED,
}
_BILLING_STATUSES_IN = {value: key for key, value in BILLING_STATUSES.items()}
_BILLINGS = {
    None: types_pb2.MODEL_BILLING_UNSPECIFIED,
    ModelBilling.INCLUDED: types_pb2.MODEL_BILLING_INCLUDED,
    ModelBilling.METERED: types_pb2.MODEL_BILLING_METERED,
}
_HOLD_STATUSES = {
    HoldStatus.OPEN: types_pb2.RESERVATION_STATUS_OPEN,
    HoldStatus.COMMITTED: types_pb2.RESERVATION_STATUS_COMMITTED,
    HoldStatus.RELEASED: types_pb2.RESERVATION_STATUS_RELEASED,
    HoldStatus.EXPIRED: types_pb2.RESERVATION_STATUS_EXPIRED,
}
_PAYMENT_SOURCES = {
    PaymentSource.CREDIT: types_pb2.PAYMENT_SOURCE_CREDIT,
    PaymentSource.INCLUDED: types_pb2.PAYMENT_SOURCE_INCLUDED,
}
_REFUND_KINDS = {
    EntryKind.RELEASE: billing_pb2.REFUND_KIND_RELEASE,
    EntryKind.REFUND: billing_pb2.REFUND_KIND_REFUND,
}
_TENANT_STATUSES = {
    TenantStatus.ACTIVE: admin_pb2.TENANT_STATUS_ACTIVE,
    TenantStatus.SUSPENDED: admin_pb2.TENANT_STATUS_SUSPENDED,
}
_TENANT_STATUSES_IN = {value: key for key, value in _TENANT_STATUSES.items()}


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


# Requests


def check_access(request: billing_pb2.CheckAccessRequest) -> commands.CheckAccess:
    estimate = _estimate(request.estimate) if request.HasField("estimate") else None
    return commands.CheckAccess(
        request.tenant_id, request.model, estimate, request.user_id, request.api_key_id
    )


def reserve(request: billing_pb2.ReserveCreditRequest) -> commands.Reserve:
    size = request.WhichOneof("size")
    return commands.Reserve(
        request_id=request.request_id,
        tenant_id=request.tenant_id,
        user_id=request.user_id,
        model=request.model,
        estimate=_estimate(request.estimate) if size == "estimate" else None,
        amount_micros=request.amount_micros if size == "amount_micros" else None,
        ttl=optional_duration(request, "ttl"),
        api_key_id=request.api_key_id,
    )


def commit(request: billing_pb2.CommitRequest) -> commands.Commit:
    usage = request.usage
    return commands.Commit(
        request_id=request.request_id,
        reservation_id=request.reservation_id,
        usage=TokenUsage(usage.input_tokens, usage.cached_input_tokens, usage.output_tokens),
    )


def refund(request: billing_pb2.RefundRequest) -> commands.Refund:
    return commands.Refund(
        request.request_id,
        request.reservation_id,
        request.amount_micros,
        request.reason,
        refund_all=request.refund_all,
    )


def release(request: billing_pb2.ReleaseRequest) -> commands.Release:
    return commands.Release(request.request_id, request.reservation_id, request.reason)


def extend_hold(request: billing_pb2.ExtendHoldRequest) -> commands.ExtendHold:
    usage = request.usage
    return commands.ExtendHold(
        request_id=request.request_id,
        reservation_id=request.reservation_id,
        additional_output_tokens=request.additional_output_tokens,
        usage=TokenUsage(usage.input_tokens, usage.cached_input_tokens, usage.output_tokens),
        ttl=optional_duration(request, "ttl"),
    )


def create_tenant(request: admin_pb2.CreateTenantRequest) -> commands.CreateTenant:
    return commands.CreateTenant(
        request_id=request.request_id,
        tenant_id=request.tenant_id,
        credit_limit_micros=(
            request.credit_limit_micros if request.HasField("credit_limit_micros") else None
        ),
        status=_tenant_status(request.status) or TenantStatus.ACTIVE,
        payment_method_on_file=request.payment_method_on_file,
    )


def update_tenant(request: admin_pb2.UpdateTenantRequest) -> commands.UpdateTenant:
    return commands.UpdateTenant(
        request_id=request.request_id,
        tenant_id=request.tenant_id,
        credit_limit_micros=(
            request.credit_limit_micros if request.HasField("credit_limit_micros") else None
        ),
        status=_tenant_status(request.status),
        payment_method_on_file=(
            request.payment_method_on_file if request.HasField("payment_method_on_file") else None
        ),
    )


def grant_credit(request: admin_pb2.GrantCreditRequest) -> commands.GrantCredit:
    return commands.GrantCredit(
        request.request_id, request.tenant_id, request.amount_micros, request.reason
    )


def _tenant_status(number: int) -> TenantStatus | None:
    return optional_enum("status", number, admin_pb2.TenantStatus.DESCRIPTOR, _TENANT_STATUSES_IN)


def billing_status_filter(number: int) -> BillingStatus | None:
    """ListTenants' filter: UNSPECIFIED lists every tenant."""
    return optional_enum(
        "billing_status", number, types_pb2.BillingStatus.DESCRIPTOR, _BILLING_STATUSES_IN
    )


def budget_scope(field: str, number: int) -> budgets.BudgetScope | None:
    """A budget scope; UNSPECIFIED reads as none (required where a budget is named)."""
    return optional_enum(field, number, types_pb2.BudgetScope.DESCRIPTOR, _BUDGET_SCOPES_IN)


def _estimate(estimate: billing_pb2.QueryEstimate) -> commands.QueryEstimate:
    return commands.QueryEstimate(estimate.input_tokens, estimate.max_output_tokens)


# Responses


def decision(value: Decision) -> types_pb2.Decision:
    return types_pb2.Decision(
        allowed=value.allowed,
        reason=_DENIAL_REASONS[value.reason],
        message=value.message,
        available_credit_micros=value.available_micros,
        model_billing=_BILLINGS[value.billing],
        required_micros=value.required_micros,
        budgets=[budget_usage(usage) for usage in value.budgets],
        exhausted_budget=(
            None if value.exhausted_budget is None else budget_usage(value.exhausted_budget)
        ),
    )


def set_budget(request: budget_pb2.SetBudgetRequest) -> budgets.SetBudget:
    budget = request.budget
    return budgets.SetBudget(
        request_id=request.request_id,
        tenant_id=budget.tenant_id,
        scope=budget_scope("budget.scope", budget.scope),
        scope_id=budget.scope_id,
        limit_micros=budget.limit_micros,
        period=optional_enum(
            "budget.period", budget.period, types_pb2.BudgetPeriod.DESCRIPTOR, _BUDGET_PERIODS_IN
        ),
    )


def delete_budget(request: budget_pb2.DeleteBudgetRequest) -> budgets.DeleteBudget:
    return budgets.DeleteBudget(
        request.request_id,
        request.tenant_id,
        budget_scope("scope", request.scope),
        request.scope_id,
    )


def budget_usage(usage: budgets.BudgetUsage) -> types_pb2.BudgetUsage:
    budget = usage.budget
    has_period = budget.period is not budgets.BudgetPeriod.NONE
    return types_pb2.BudgetUsage(
        budget=types_pb2.Budget(
            tenant_id=budget.tenant_id,
            scope=_BUDGET_SCOPES[budget.scope],
            scope_id=budget.scope_id,
            limit_micros=budget.limit_micros,
            period=_BUDGET_PERIODS[budget.period],
        ),
        spent_micros=usage.spent_micros,
        held_micros=usage.held_micros,
        remaining_micros=usage.remaining_micros,
        period_start_time=timestamp(usage.period_start) if has_period else None,
        reset_time=timestamp(usage.reset_time),
    )


def reservation(hold: Hold) -> types_pb2.Reservation:
    return types_pb2.Reservation(
        reservation_id=hold.hold_id,
        tenant_id=hold.tenant_id,
        user_id=hold.user_id,
        model=hold.model,
        amount_micros=hold.amount_micros,
        create_time=timestamp(hold.created_at),
        expire_time=timestamp(hold.expires_at),
        status=_HOLD_STATUSES[hold.status],
    )


def usage_record(record: UsageRecord) -> types_pb2.UsageRecord:
    usage = record.usage
    return types_pb2.UsageRecord(
        reservation_id=record.hold_id,
        tenant_id=record.tenant_id,
        user_id=record.user_id,
        model=record.model,
        usage=types_pb2.TokenUsage(
            input_tokens=usage.input_tokens,
            cached_input_tokens=usage.cached_input_tokens,
            output_tokens=usage.output_tokens,
        ),
        cost_micros=record.cost_micros,
        charged_micros=record.charged_micros,
        uncollected_micros=record.uncollected_micros,
        held_micros=record.held_micros,
        payment_source=_PAYMENT_SOURCES[record.payment_source],
        reserve_time=timestamp(record.reserved_at),
        commit_time=timestamp(record.committed_at),
    )


def commit_response(outcome: CommitOutcome) -> billing_pb2.CommitResponse:
    return billing_pb2.CommitResponse(
        usage_record=usage_record(outcome.record),
        available_credit_micros=outcome.available_after_micros,
    )


def refund_response(outcome: RefundOutcome) -> billing_pb2.RefundResponse:
    return billing_pb2.RefundResponse(
        kind=_REFUND_KINDS[outcome.kind],
        amount_micros=outcome.amount_micros,
        available_credit_micros=outcome.available_after_micros,
        refunded_total_micros=outcome.refunded_total_micros,
    )


def release_response(outcome: ReleaseOutcome) -> billing_pb2.ReleaseResponse:
    return billing_pb2.ReleaseResponse(
        released_micros=outcome.released_micros,
        available_credit_micros=outcome.available_after_micros,
    )


def extend_hold_response(result: ExtendResult) -> billing_pb2.ExtendHoldResponse:
    return billing_pb2.ExtendHoldResponse(
        decision=decision(result.decision),
        reservation=reservation(result.hold),
        extended_micros=result.extended_micros,
        covered_output_tokens=result.covered_output_tokens,
    )


def balance(value: Balance) -> admin_pb2.Balance:
    return admin_pb2.Balance(
        balance_micros=value.balance_micros,
        held_micros=value.held_micros,
        effective_credit_limit_micros=value.effective_credit_limit_micros,
        available_credit_micros=value.available_micros,
        exposure_micros=value.exposure_micros,
    )


def tenant(account: Account) -> admin_pb2.Tenant:
    return admin_pb2.Tenant(
        tenant_id=account.tenant_id,
        status=_TENANT_STATUSES[account.status],
        credit_limit_micros=account.credit_limit_micros,
        payment_method_on_file=account.payment_method_on_file,
        balance=balance(Balance.of(account)),
        create_time=timestamp(account.created_at),
        update_time=timestamp(account.updated_at),
        billing_status=BILLING_STATUSES[account.billing_status],
    )
