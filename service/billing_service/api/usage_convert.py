"""UsageService messages <-> dashboard values. Pure translation: the rules are in usage.py."""

from __future__ import annotations

from billing.v1 import account_pb2, types_pb2, usage_pb2
from billing_service.api.convert import budget_usage, tenant, timestamp, usage_record
from billing_service.api.fields import optional_time, repeated_enum
from billing_service.domain.model import UsageRecord
from billing_service.usage import (
    LedgerEntryView,
    LedgerFilter,
    Page,
    UsageFilter,
    UsageSummary,
    UsageTotals,
)

_KINDS = {
    usage_pb2.LEDGER_ENTRY_KIND_GRANT: "grant",
    usage_pb2.LEDGER_ENTRY_KIND_HOLD: "hold",
    usage_pb2.LEDGER_ENTRY_KIND_RELEASE: "release",
    usage_pb2.LEDGER_ENTRY_KIND_EXPIRY: "expiry",
    usage_pb2.LEDGER_ENTRY_KIND_DEBIT: "debit",
    usage_pb2.LEDGER_ENTRY_KIND_REFUND: "refund",
    usage_pb2.LEDGER_ENTRY_KIND_TOP_UP: "top_up",
    usage_pb2.LEDGER_ENTRY_KIND_TOP_UP_REVERSAL: "top_up_reversal",
    usage_pb2.LEDGER_ENTRY_KIND_EXTENSION: "extension",
}
_KINDS_OUT = {name: kind for kind, name in _KINDS.items()}


# Requests


def usage_filter(request: usage_pb2.ListUsageRecordsRequest) -> UsageFilter:
    return UsageFilter(
        tenant_id=request.tenant_id,
        start=optional_time(request, "start_time"),
        end=optional_time(request, "end_time"),
        model=request.model,
        user_id=request.user_id,
    )


def ledger_filter(request: usage_pb2.ListLedgerEntriesRequest) -> LedgerFilter:
    kinds = sorted(
        set(repeated_enum("kinds", request.kinds, usage_pb2.LedgerEntryKind.DESCRIPTOR, _KINDS))
    )
    return LedgerFilter(
        tenant_id=request.tenant_id,
        start=optional_time(request, "start_time"),
        end=optional_time(request, "end_time"),
        kinds=tuple(kinds),
    )


# Responses


def totals(value: UsageTotals) -> usage_pb2.UsageTotals:
    return usage_pb2.UsageTotals(
        call_count=value.call_count,
        tokens=types_pb2.TokenUsage(
            input_tokens=value.input_tokens,
            cached_input_tokens=value.cached_input_tokens,
            output_tokens=value.output_tokens,
        ),
        cost_micros=value.cost_micros,
        charged_micros=value.charged_micros,
    )


def summary_response(
    summary: UsageSummary[account_pb2.BillingProfile],
) -> usage_pb2.GetUsageSummaryResponse:
    usage = summary.usage
    return usage_pb2.GetUsageSummaryResponse(
        tenant=tenant(summary.account),
        limit_used_basis_points=summary.limit_used_basis_points,
        billing_profile=summary.billing_profile,
        start_time=timestamp(summary.period.start),
        end_time=timestamp(summary.period.end),
        totals=totals(usage.totals),
        by_model=[
            usage_pb2.ModelUsage(model=model, totals=totals(value))
            for model, value in usage.by_model
        ],
        by_user=[
            usage_pb2.UserUsage(user_id=user_id, totals=totals(value))
            for user_id, value in usage.by_user
        ],
        by_user_truncated=usage.by_user_truncated,
        budgets=[budget_usage(value) for value in summary.budgets],
    )


def usage_records_response(page: Page[UsageRecord]) -> usage_pb2.ListUsageRecordsResponse:
    return usage_pb2.ListUsageRecordsResponse(
        usage_records=[usage_record(record) for record in page.items],
        next_page_token=page.next_page_token,
    )


def ledger_entry(entry: LedgerEntryView) -> usage_pb2.LedgerEntry:
    return usage_pb2.LedgerEntry(
        ledger_entry_id=entry.entry_id,
        kind=_KINDS_OUT.get(entry.kind, usage_pb2.LEDGER_ENTRY_KIND_UNSPECIFIED),
        balance_delta_micros=entry.balance_delta_micros,
        held_delta_micros=entry.held_delta_micros,
        balance_after_micros=entry.balance_after_micros,
        available_after_micros=entry.available_after_micros,
        reservation_id=entry.hold_id or "",
        memo=entry.memo or "",
        create_time=timestamp(entry.created_at),
        charge_id=entry.charge_id or "",
        payment_intent_id=entry.payment_intent_id or "",
    )


def ledger_entries_response(
    page: Page[LedgerEntryView],
) -> usage_pb2.ListLedgerEntriesResponse:
    return usage_pb2.ListLedgerEntriesResponse(
        ledger_entries=[ledger_entry(entry) for entry in page.items],
        next_page_token=page.next_page_token,
    )
