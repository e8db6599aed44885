"""What the billing page shows, computed from the service's answers: plain functions of the
protobuf messages, no I/O. Money stays integer micros until it is written as dollars by
billingctl's exact formatting (nothing rounded, no float)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from billing.ctl.money import format_basis_points
from billing.v1 import account_pb2, admin_pb2, types_pb2, usage_pb2

FULL_BAR_BASIS_POINTS = 10_000


@dataclass(frozen=True)
class CreditBar:
    """Unpaid exposure against the credit limit in force."""

    used_micros: int
    limit_micros: int
    basis_points: int
    width: str
    """The CSS width of the filled part, "0.00%" to "100.00%"."""

    @property
    def percent(self) -> str:
        return format_basis_points(self.basis_points)

    @property
    def level(self) -> str:
        """ "ok", "warn" (75 % and more) or "full" (100 % and more): the bar's colour."""
        if self.basis_points >= FULL_BAR_BASIS_POINTS:
            return "full"
        return "warn" if self.basis_points >= 7_500 else "ok"


def credit_bar(balance: admin_pb2.Balance, limit_used_basis_points: int) -> CreditBar:
    """The bar of a summary: the service's own share (rounded down, 0 without a limit), drawn
    at most full (an operator may have lowered the limit under the exposure)."""
    shown = min(max(limit_used_basis_points, 0), FULL_BAR_BASIS_POINTS)
    return CreditBar(
        used_micros=balance.exposure_micros,
        limit_micros=balance.effective_credit_limit_micros,
        basis_points=limit_used_basis_points,
        width=f"{shown // 100}.{shown % 100:02d}%",
    )


@dataclass(frozen=True)
class Standing:
    """The billing status in one line, what it means, and what the admin can do about it."""

    level: str
    """"ok", "warn" or "bad": the banner's colour."""
    title: str
    detail: str = ""
    action: str = ""
    """The label of a link to the card form; empty when the card form cannot help."""


def standing(
    tenant: admin_pb2.Tenant, profile: account_pb2.BillingProfile | None, *, can_add_card: bool
) -> Standing:
    """The service words each billing problem (`billing_status_message`); the page adds the
    way out it offers. Ordered by what blocks most: a suspension blocks every model."""
    card_action = "Update your card" if can_add_card else ""
    if tenant.status == admin_pb2.TENANT_STATUS_SUSPENDED:
        return Standing(
            "bad", "Account suspended", "No model may be used. Contact support to resume."
        )
    status = profile.billing_status if profile is not None else tenant.billing_status
    message = profile.billing_status_message if profile is not None else ""
    if status == types_pb2.BILLING_STATUS_PAYMENT_FAILED:
        return Standing("bad", "Payment failed", message, card_action)
    if status == types_pb2.BILLING_STATUS_ACTION_REQUIRED:
        detail = f"{message} Saving the card again also clears it." if can_add_card else message
        return Standing("bad", "Authentication required", detail, card_action)
    if status == types_pb2.BILLING_STATUS_DISPUTED:
        return Standing("bad", "Payment disputed", message)
    if not tenant.payment_method_on_file:
        detail = "Metered models need a card on file (or prepaid credit); included models work."
        return Standing("warn", "No card on file", detail, "Add a card" if can_add_card else "")
    if profile is not None and _top_ups_at_ceiling(profile):
        detail = (
            "Automatic top-ups reached this month's ceiling: metered queries that need more "
            "credit are denied until the 1st (UTC) or a higher ceiling."
        )
        return Standing("warn", "Top-up ceiling reached", detail)
    return Standing("ok", "Good standing")


def _top_ups_at_ceiling(profile: account_pb2.BillingProfile) -> bool:
    if not profile.HasField("payment_method"):
        return False
    top_up = profile.auto_top_up
    charged = profile.automatic_top_ups_this_month_micros
    return top_up.enabled and charged + top_up.amount_micros > top_up.monthly_limit_micros


def utc_time(timestamp: Timestamp) -> str:
    """`2026-11-24 13:05:09 UTC`; empty for an unset time."""
    if timestamp.seconds == 0 and timestamp.nanos == 0:
        return ""
    return timestamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def month_label(start: Timestamp) -> str:
    """The summary's period as a person names it: `November 2026`."""
    return datetime.fromtimestamp(start.seconds, tz=UTC).strftime("%B %Y")


_PAYMENT_SOURCES = {
    types_pb2.PAYMENT_SOURCE_CREDIT: "credit",
    types_pb2.PAYMENT_SOURCE_INCLUDED: "included",
}


def payment_source_label(record: types_pb2.UsageRecord) -> str:
    return _PAYMENT_SOURCES.get(record.payment_source, "")


def totals_tokens(totals: usage_pb2.UsageTotals) -> int:
    tokens = totals.tokens
    return tokens.input_tokens + tokens.cached_input_tokens + tokens.output_tokens
