"""One function per subcommand: build the request, make the call, print the answer.

Each takes the `Context` and the parsed arguments (see `billing.ctl.cli` for their names).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO, TextIO, TypeVar

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from billing.ctl.money import format_basis_points, format_dollars
from billing.ctl.output import (
    count,
    enum_label,
    format_age,
    format_date,
    format_time,
    print_fields,
    print_json,
    print_table,
    timestamp_of,
)
from billing.v1 import (
    account_pb2,
    admin_pb2,
    admin_pb2_grpc,
    billing_pb2,
    billing_pb2_grpc,
    types_pb2,
    usage_pb2,
    usage_pb2_grpc,
)

Request = TypeVar("Request", bound=Message)
Response = TypeVar("Response", bound=Message)

_MAX_PAGE_SIZE = 1000


@dataclass
class Context:
    """What every command needs: the stubs on one channel (which sends the token), the call
    options, where to print."""

    channel: grpc.Channel
    timeout_s: float
    stream_timeout_s: float | None
    request_id: str
    json: bool
    out: TextIO
    binary_out: BinaryIO

    @property
    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(self.channel)

    @property
    def billing(self) -> billing_pb2_grpc.BillingServiceStub:
        return billing_pb2_grpc.BillingServiceStub(self.channel)

    @property
    def usage(self) -> usage_pb2_grpc.UsageServiceStub:
        return usage_pb2_grpc.UsageServiceStub(self.channel)

    def call(
        self, method: grpc.UnaryUnaryMultiCallable[Request, Response], request: Request
    ) -> Response:
        return method(request, timeout=self.timeout_s)


Command = Callable[[Context, argparse.Namespace], None]


# Tenants


def create_tenant(ctx: Context, args: argparse.Namespace) -> None:
    request = admin_pb2.CreateTenantRequest(
        request_id=ctx.request_id,
        tenant_id=args.tenant_id,
        credit_limit_micros=args.credit_limit_micros,
        status=args.status,
        payment_method_on_file=bool(args.payment_method),
    )
    response = ctx.call(ctx.admin.CreateTenant, request)
    _show_tenant(ctx, response, response.tenant)


def update_tenant(ctx: Context, args: argparse.Namespace) -> None:
    request = admin_pb2.UpdateTenantRequest(
        request_id=ctx.request_id,
        tenant_id=args.tenant_id,
        credit_limit_micros=args.credit_limit_micros,
        status=args.status,
        payment_method_on_file=args.payment_method,
    )
    response = ctx.call(ctx.admin.UpdateTenant, request)
    _show_tenant(ctx, response, response.tenant)


def get_tenant(ctx: Context, args: argparse.Namespace) -> None:
    response = ctx.call(ctx.admin.GetTenant, admin_pb2.GetTenantRequest(tenant_id=args.tenant_id))
    _show_tenant(ctx, response, response.tenant)


def list_tenants(ctx: Context, args: argparse.Namespace) -> None:
    merged = admin_pb2.ListTenantsResponse()
    token = args.page_token
    while True:
        request = admin_pb2.ListTenantsRequest(
            billing_status=args.billing_status,
            page_size=_page_size(args.limit, len(merged.tenants)),
            page_token=token,
        )
        page = ctx.call(ctx.admin.ListTenants, request)
        merged.tenants.extend(page.tenants)
        token = page.next_page_token
        if not token or _full(args.limit, len(merged.tenants)):
            break
    merged.next_page_token = token
    if ctx.json:
        print_json(merged, ctx.out)
        return
    rows = [
        [
            tenant.tenant_id,
            _tenant_status(tenant.status),
            _billing_status(tenant.billing_status),
            "yes" if tenant.payment_method_on_file else "no",
            format_dollars(tenant.credit_limit_micros),
            format_dollars(tenant.balance.balance_micros),
            format_dollars(tenant.balance.held_micros),
            format_dollars(tenant.balance.available_credit_micros),
        ]
        for tenant in merged.tenants
    ]
    headers = ["TENANT", "STATUS", "BILLING", "CARD", "LIMIT", "BALANCE", "HELD", "AVAILABLE"]
    print_table(headers, rows, ctx.out, right={4, 5, 6, 7})
    _more(ctx, token)


def _show_tenant(ctx: Context, response: Message, tenant: admin_pb2.Tenant) -> None:
    if ctx.json:
        print_json(response, ctx.out)
        return
    print_fields(_tenant_fields(tenant), ctx.out)


def _tenant_fields(tenant: admin_pb2.Tenant) -> list[tuple[str, str]]:
    balance = tenant.balance
    return [
        ("Tenant", tenant.tenant_id),
        ("Status", _tenant_status(tenant.status)),
        ("Billing status", _billing_status(tenant.billing_status)),
        ("Payment method", "on file" if tenant.payment_method_on_file else "none"),
        ("Credit limit", format_dollars(tenant.credit_limit_micros)),
        ("Effective limit", format_dollars(balance.effective_credit_limit_micros)),
        ("Balance", format_dollars(balance.balance_micros)),
        ("Open holds", format_dollars(balance.held_micros)),
        ("Available", format_dollars(balance.available_credit_micros)),
        ("Exposure", format_dollars(balance.exposure_micros)),
        ("Created", format_time(tenant.create_time)),
        ("Updated", format_time(tenant.update_time)),
    ]


# Credit and refunds


def grant_credit(ctx: Context, args: argparse.Namespace) -> None:
    request = admin_pb2.GrantCreditRequest(
        request_id=ctx.request_id,
        tenant_id=args.tenant_id,
        amount_micros=args.amount_micros,
        reason=args.reason,
    )
    response = ctx.call(ctx.admin.GrantCredit, request)
    if ctx.json:
        print_json(response, ctx.out)
        return
    balance = response.balance
    ctx.out.write(
        f"Granted {format_dollars(args.amount_micros)} to {args.tenant_id} "
        f"(ledger entry {response.ledger_entry_id}).\n"
        f"Balance {format_dollars(balance.balance_micros)}, "
        f"available {format_dollars(balance.available_credit_micros)}.\n"
    )


def refund(ctx: Context, args: argparse.Namespace) -> None:
    request = billing_pb2.RefundRequest(
        request_id=ctx.request_id,
        reservation_id=args.reservation_id,
        amount_micros=args.amount_micros or 0,
        refund_all=args.everything,
        reason=args.reason,
    )
    response = ctx.call(ctx.billing.Refund, request)
    if ctx.json:
        print_json(response, ctx.out)
        return
    ctx.out.write(
        f"Refunded {format_dollars(response.amount_micros)} of {args.reservation_id} "
        f"(refunded in all: {format_dollars(response.refunded_total_micros)}).\n"
        f"Available {format_dollars(response.available_credit_micros)}.\n"
    )


def release(ctx: Context, args: argparse.Namespace) -> None:
    request = billing_pb2.ReleaseRequest(
        request_id=ctx.request_id, reservation_id=args.reservation_id, reason=args.reason
    )
    response = ctx.call(ctx.billing.Release, request)
    if ctx.json:
        print_json(response, ctx.out)
        return
    ctx.out.write(
        f"Released the open hold {args.reservation_id} "
        f"({format_dollars(response.released_micros)}).\n"
        f"Available {format_dollars(response.available_credit_micros)}.\n"
    )


# Open holds


def list_open_holds(ctx: Context, args: argparse.Namespace) -> None:
    merged = admin_pb2.ListOpenHoldsResponse()
    token = args.page_token
    while True:
        request = admin_pb2.ListOpenHoldsRequest(
            tenant_id=args.tenant_id,
            user_id=args.user,
            api_key_id=args.api_key,
            page_size=_page_size(args.limit, len(merged.holds)),
            page_token=token,
        )
        page = ctx.call(ctx.admin.ListOpenHolds, request)
        merged.holds.extend(page.holds)
        token = page.next_page_token
        if not token or _full(args.limit, len(merged.holds)):
            break
    merged.next_page_token = token
    if ctx.json:
        print_json(merged, ctx.out)
        return
    now = datetime.now(UTC)
    rows = [
        [
            hold.hold_id,
            hold.user_id or "-",
            hold.api_key_id or "-",
            hold.model,
            format_dollars(hold.amount_micros),
            format_time(hold.create_time),
            format_age(hold.create_time, now),
            format_time(hold.expire_time),
        ]
        for hold in merged.holds
    ]
    headers = ["HOLD", "USER", "API KEY", "MODEL", "AMOUNT", "CREATED", "AGE", "EXPIRES"]
    print_table(headers, rows, ctx.out, right={4, 6})
    _more(ctx, token)


# Card charges


def list_charges(ctx: Context, args: argparse.Namespace) -> None:
    merged = admin_pb2.ListChargesResponse()
    token = args.page_token
    while True:
        request = admin_pb2.ListChargesRequest(
            status=args.status,
            tenant_id=args.tenant,
            page_size=_page_size(args.limit, len(merged.charges)),
            page_token=token,
        )
        page = ctx.call(ctx.admin.ListCharges, request)
        merged.charges.extend(page.charges)
        token = page.next_page_token
        if not token or _full(args.limit, len(merged.charges)):
            break
    merged.next_page_token = token
    if ctx.json:
        print_json(merged, ctx.out)
        return
    rows = [
        [
            charge.charge_id,
            charge.tenant_id,
            _charge_trigger(charge.trigger),
            _charge_status(charge.status),
            format_dollars(charge.amount_micros),
            charge.payment_intent_id or "-",
            format_time(charge.create_time),
            charge.failure_message,
        ]
        for charge in merged.charges
    ]
    headers = ["CHARGE", "TENANT", "TRIGGER", "STATUS", "AMOUNT", "PAYMENT INTENT", "CREATED"]
    print_table([*headers, "NOTE"], rows, ctx.out, right={4})
    _more(ctx, token)


def resolve_charge(ctx: Context, args: argparse.Namespace) -> None:
    request = admin_pb2.ResolveChargeRequest(
        request_id=ctx.request_id,
        charge_id=args.charge_id,
        outcome=args.outcome,
        payment_intent_id=args.payment_intent,
        reason=args.reason,
    )
    response = ctx.call(ctx.admin.ResolveCharge, request)
    if ctx.json:
        print_json(response, ctx.out)
        return
    charge = response.charge
    intent = f", PaymentIntent {charge.payment_intent_id}" if charge.payment_intent_id else ""
    ctx.out.write(
        f"Charge {charge.charge_id} of {charge.tenant_id} ({format_dollars(charge.amount_micros)}"
        f"{intent}) is {_charge_status(charge.status)}.\n"
    )


# The dashboard: summary, usage, ledger


def summary(ctx: Context, args: argparse.Namespace) -> None:
    request = usage_pb2.GetUsageSummaryRequest(
        tenant_id=args.tenant_id,
        start_time=_timestamp(args.since),
        end_time=_timestamp(args.until),
    )
    response = ctx.call(ctx.usage.GetUsageSummary, request)
    if ctx.json:
        print_json(response, ctx.out)
        return
    tenant, profile, totals = response.tenant, response.billing_profile, response.totals
    fields = _tenant_fields(tenant)[:-2]
    fields += [
        ("Limit used", format_basis_points(response.limit_used_basis_points)),
        ("Card", _card(profile)),
        ("Auto top-up", _auto_top_up(profile.auto_top_up)),
    ]
    if profile.billing_status_message:
        fields.append(("Billing note", profile.billing_status_message))
    fields += [
        ("Period", f"{format_date(response.start_time)} to {format_date(response.end_time)} (UTC)"),
        ("Calls", count(totals.call_count)),
        ("Cost", format_dollars(totals.cost_micros)),
        ("Charged", format_dollars(totals.charged_micros)),
    ]
    print_fields(fields, ctx.out)
    headers = ["CALLS", "INPUT", "CACHED", "OUTPUT", "COST", "CHARGED"]
    ctx.out.write("\nBy model\n")
    print_table(
        ["MODEL", *headers],
        [[usage.model, *_totals_cells(usage.totals)] for usage in response.by_model],
        ctx.out,
        right={1, 2, 3, 4, 5, 6},
    )
    ctx.out.write("\nBy user\n")
    print_table(
        ["USER", *headers],
        [[usage.user_id, *_totals_cells(usage.totals)] for usage in response.by_user],
        ctx.out,
        right={1, 2, 3, 4, 5, 6},
    )
    if response.by_user_truncated:
        ctx.out.write("(only the first 1,000 users are listed)\n")


def list_usage(ctx: Context, args: argparse.Namespace) -> None:
    merged = usage_pb2.ListUsageRecordsResponse()
    token = args.page_token
    while True:
        request = usage_pb2.ListUsageRecordsRequest(
            tenant_id=args.tenant_id,
            start_time=_timestamp(args.since),
            end_time=_timestamp(args.until),
            model=args.model,
            user_id=args.user,
            page_size=_page_size(args.limit, len(merged.usage_records)),
            page_token=token,
        )
        page = ctx.call(ctx.usage.ListUsageRecords, request)
        merged.usage_records.extend(page.usage_records)
        token = page.next_page_token
        if not token or _full(args.limit, len(merged.usage_records)):
            break
    merged.next_page_token = token
    if ctx.json:
        print_json(merged, ctx.out)
        return
    rows = [
        [
            format_time(record.commit_time),
            record.reservation_id,
            record.user_id,
            record.model,
            count(record.usage.input_tokens),
            count(record.usage.cached_input_tokens),
            count(record.usage.output_tokens),
            format_dollars(record.cost_micros),
            format_dollars(record.charged_micros),
        ]
        for record in merged.usage_records
    ]
    headers = ["COMMITTED (UTC)", "RESERVATION", "USER", "MODEL"]
    headers += ["INPUT", "CACHED", "OUTPUT", "COST", "CHARGED"]
    print_table(headers, rows, ctx.out, right={4, 5, 6, 7, 8})
    _more(ctx, token)


def export_usage(ctx: Context, args: argparse.Namespace) -> None:
    request = usage_pb2.ExportUsageCsvRequest(
        tenant_id=args.tenant_id,
        start_time=_timestamp(args.since),
        end_time=_timestamp(args.until),
    )
    for chunk in ctx.usage.ExportUsageCsv(request, timeout=ctx.stream_timeout_s):
        ctx.binary_out.write(chunk.csv_data)
    ctx.binary_out.flush()


def list_ledger(ctx: Context, args: argparse.Namespace) -> None:
    merged = usage_pb2.ListLedgerEntriesResponse()
    token = args.page_token
    while True:
        request = usage_pb2.ListLedgerEntriesRequest(
            tenant_id=args.tenant_id,
            start_time=_timestamp(args.since),
            end_time=_timestamp(args.until),
            kinds=args.kinds,
            page_size=_page_size(args.limit, len(merged.ledger_entries)),
            page_token=token,
        )
        page = ctx.call(ctx.usage.ListLedgerEntries, request)
        merged.ledger_entries.extend(page.ledger_entries)
        token = page.next_page_token
        if not token or _full(args.limit, len(merged.ledger_entries)):
            break
    merged.next_page_token = token
    if ctx.json:
        print_json(merged, ctx.out)
        return
    rows = [
        [
            str(entry.ledger_entry_id),
            format_time(entry.create_time),
            enum_label(usage_pb2.LedgerEntryKind.Name(entry.kind), "LEDGER_ENTRY_KIND_"),
            format_dollars(entry.balance_delta_micros),
            format_dollars(entry.held_delta_micros),
            format_dollars(entry.balance_after_micros),
            format_dollars(entry.available_after_micros),
            entry.reservation_id or entry.charge_id,
            entry.memo,
        ]
        for entry in merged.ledger_entries
    ]
    headers = ["ID", "TIME (UTC)", "KIND", "BALANCE +/-", "HELD +/-", "BALANCE", "AVAILABLE"]
    headers += ["RESERVATION / CHARGE", "MEMO"]
    print_table(headers, rows, ctx.out, right={0, 3, 4, 5, 6})
    _more(ctx, token)


# Helpers


def _page_size(limit: int | None, have: int) -> int:
    return _MAX_PAGE_SIZE if limit is None else min(limit - have, _MAX_PAGE_SIZE)


def _full(limit: int | None, have: int) -> bool:
    return limit is not None and have >= limit


def _more(ctx: Context, token: str) -> None:
    if token:
        ctx.out.write(f"(more: --page-token {token})\n")


def _timestamp(moment: datetime | None) -> Timestamp | None:
    return None if moment is None else timestamp_of(moment)


def _tenant_status(status: int) -> str:
    return enum_label(admin_pb2.TenantStatus.Name(status), "TENANT_STATUS_")  # type: ignore[arg-type]


def _charge_status(status: int) -> str:
    return enum_label(account_pb2.ChargeStatus.Name(status), "CHARGE_STATUS_")  # type: ignore[arg-type]


def _charge_trigger(trigger: int) -> str:
    return enum_label(account_pb2.ChargeTrigger.Name(trigger), "CHARGE_TRIGGER_")  # type: ignore[arg-type]


def _billing_status(status: int) -> str:
    return enum_label(types_pb2.BillingStatus.Name(status), "BILLING_STATUS_")  # type: ignore[arg-type]


def _card(profile: account_pb2.BillingProfile) -> str:
    if not profile.HasField("payment_method"):
        return "none"
    card = profile.payment_method
    return f"{card.brand} ending {card.last4}"


def _auto_top_up(settings: types_pb2.AutoTopUpSettings) -> str:
    if not settings.enabled:
        return "off"
    return (
        f"{format_dollars(settings.amount_micros)} when available credit is below "
        f"{format_dollars(settings.threshold_micros)}"
    )


def _totals_cells(totals: usage_pb2.UsageTotals) -> list[str]:
    tokens = totals.tokens
    return [
        count(totals.call_count),
        count(tokens.input_tokens),
        count(tokens.cached_input_tokens),
        count(tokens.output_tokens),
        format_dollars(totals.cost_micros),
        format_dollars(totals.charged_micros),
    ]
