"""The usage dashboard: a tenant's summary, its usage records, its statement and the CSV export.

Plain Python over a small storage port, like core.py. Periods are half-open UTC intervals
[start, end). Summaries read the per-day rollups kept in the commit transaction, so their
boundaries must be UTC midnights and their cost does not grow with a tenant's history.
Lists are keyset-paginated (AIP-158): a page token carries the last position returned and a
fingerprint of the filters it was made for.
"""

from __future__ import annotations

import csv
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import MAXYEAR, UTC, date, datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar

from billing_service.domain.budgets import BudgetUsage
from billing_service.domain.commands import check_id
from billing_service.domain.errors import ErrorReason, InvalidArgument, NotFound
from billing_service.domain.model import Account, UsageRecord
from billing_service.domain.page_tokens import (
    PageTokens,
    filters_fingerprint,
    position_count,
    position_text,
    position_time,
)

Clock = Callable[[], datetime]

PAGE_SIZE_DEFAULT = 100
PAGE_SIZE_MAX = 1000
PERIOD_DAYS_MAX = 366
BY_USER_MAX = 1000
BASIS_POINTS_MAX = 2**31 - 1  # the proto field is an int32
# A CSV chunk holds whole lines and is sent once it reaches this size.
CSV_CHUNK_BYTES = 64 * 1024
# Usage records read per query while exporting: the export never holds more in memory.
EXPORT_BATCH = 500

LEDGER_KINDS = frozenset(
    {
        "grant",
        "hold",
        "extension",
        "release",
        "expiry",
        "debit",
        "refund",
        "top_up",
        "top_up_reversal",
    }
)

CSV_HEADER = (
    "reservation_id",
    "tenant_id",
    "user_id",
    "model",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "cost_micros",
    "charged_micros",
    "uncollected_micros",
    "held_micros",
    "payment_source",
    "reserve_time",
    "commit_time",
)

ProfileT = TypeVar("ProfileT")
ProfileT_co = TypeVar("ProfileT_co", covariant=True)
ItemT = TypeVar("ItemT")


@dataclass(frozen=True, slots=True)
class UsageTotals:
    call_count: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = 0
    charged_micros: int = 0

    def __add__(self, other: UsageTotals) -> UsageTotals:
        return UsageTotals(
            self.call_count + other.call_count,
            self.input_tokens + other.input_tokens,
            self.cached_input_tokens + other.cached_input_tokens,
            self.output_tokens + other.output_tokens,
            self.cost_micros + other.cost_micros,
            self.charged_micros + other.charged_micros,
        )


@dataclass(frozen=True, slots=True)
class PeriodUsage:
    """A period's usage: per model (all of them) and per user (the costliest, at most a limit)."""

    by_model: Sequence[tuple[str, UsageTotals]]
    by_user: Sequence[tuple[str, UsageTotals]]
    by_user_truncated: bool

    @property
    def totals(self) -> UsageTotals:
        total = UsageTotals()
        for _, totals in self.by_model:
            total += totals
        return total


@dataclass(frozen=True, slots=True)
class Period:
    start: datetime
    end: datetime

    @property
    def first_day(self) -> date:
        return self.start.date()

    @property
    def end_day(self) -> date:
        return self.end.date()


@dataclass(frozen=True, slots=True)
class UsageSummary(Generic[ProfileT]):
    account: Account
    limit_used_basis_points: int
    period: Period
    usage: PeriodUsage
    billing_profile: ProfileT | None
    # Every budget of the tenant with its use in its own current period.
    budgets: tuple[BudgetUsage, ...] = ()


@dataclass(frozen=True, slots=True)
class UsageFilter:
    tenant_id: str
    start: datetime | None = None
    end: datetime | None = None
    model: str = ""
    user_id: str = ""


@dataclass(frozen=True, slots=True)
class LedgerFilter:
    tenant_id: str
    start: datetime | None = None
    end: datetime | None = None
    kinds: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RecordPosition:
    """Where a usage record sits in a tenant's list: by commit time, ties broken by its id."""

    committed_at: datetime
    hold_id: str


@dataclass(frozen=True, slots=True)
class LedgerEntryView:
    entry_id: int
    kind: str
    balance_delta_micros: int
    held_delta_micros: int
    balance_after_micros: int
    available_after_micros: int
    hold_id: str | None
    memo: str | None
    created_at: datetime
    # Set on top-up entries (and their reversals): our charge and Stripe's PaymentIntent.
    charge_id: str | None = None
    payment_intent_id: str | None = None


@dataclass(frozen=True, slots=True)
class Page(Generic[ItemT]):
    items: Sequence[ItemT]
    next_page_token: str


class UsagePort(Protocol):
    """What the dashboard needs from storage; each call is one short read."""

    async def get_account(self, tenant_id: str) -> Account | None: ...

    async def period_usage(
        self, tenant_id: str, first_day: date, end_day: date, user_limit: int
    ) -> PeriodUsage: ...

    async def usage_records(
        self,
        where: UsageFilter,
        after: RecordPosition | None,
        limit: int,
        *,
        newest_first: bool,
    ) -> Sequence[UsageRecord]: ...

    async def ledger_entries(
        self, where: LedgerFilter, before_entry_id: int | None, limit: int
    ) -> Sequence[LedgerEntryView]: ...


class TenantBudgets(Protocol):
    async def tenant_budgets(self, tenant_id: str, now: datetime) -> list[BudgetUsage]: ...


class BillingProfiles(Protocol[ProfileT_co]):
    """The card, billing status and top-up settings of a tenant (the payments side)."""

    async def billing_profile(self, tenant_id: str) -> ProfileT_co | None: ...


def utc_now() -> datetime:
    return datetime.now(UTC)


class UsageDashboard(Generic[ProfileT]):
    def __init__(
        self,
        store: UsagePort,
        clock: Clock = utc_now,
        billing_profiles: BillingProfiles[ProfileT] | None = None,
        budgets: TenantBudgets | None = None,
        *,
        page_tokens: PageTokens,
    ) -> None:
        self._store = store
        self._page_tokens = page_tokens
        self._clock = clock
        self._billing_profiles = billing_profiles
        self._budgets = budgets

    async def summary(
        self, tenant_id: str, start: datetime | None, end: datetime | None
    ) -> UsageSummary[ProfileT]:
        check_id("tenant_id", tenant_id)
        period = summary_period(start, end, self._clock())
        account = await self._account(tenant_id)
        usage = await self._store.period_usage(
            tenant_id, period.first_day, period.end_day, BY_USER_MAX
        )
        profile = None
        if self._billing_profiles is not None:
            profile = await self._billing_profiles.billing_profile(tenant_id)
        budgets: tuple[BudgetUsage, ...] = ()
        if self._budgets is not None:
            budgets = tuple(await self._budgets.tenant_budgets(tenant_id, self._clock()))
        return UsageSummary(
            account, limit_used_basis_points(account), period, usage, profile, budgets
        )

    async def usage_records(
        self, where: UsageFilter, page_size: int, page_token: str
    ) -> Page[UsageRecord]:
        _check_usage_filter(where)
        size = _page_size(page_size)
        fingerprint = _fingerprint("usage", where)
        position = await self._page_tokens.read(page_token, fingerprint, 2)
        after = None
        if position is not None:
            after = RecordPosition(position_time(position[0]), position_text(position[1]))
        await self._account(where.tenant_id)
        found = await self._store.usage_records(where, after, size + 1, newest_first=True)
        items = found[:size]
        token = ""
        if len(found) > size:
            last = items[-1]
            position_written = [last.committed_at.isoformat(), last.hold_id]
            token = await self._page_tokens.make(fingerprint, position_written)
        return Page(items, token)

    async def ledger_entries(
        self, where: LedgerFilter, page_size: int, page_token: str
    ) -> Page[LedgerEntryView]:
        check_id("tenant_id", where.tenant_id)
        _check_range(where.start, where.end)
        if unknown := set(where.kinds) - LEDGER_KINDS:
            raise InvalidArgument("kinds", f"unknown kind {sorted(unknown)[0]}")
        size = _page_size(page_size)
        fingerprint = _fingerprint("ledger", where)
        position = await self._page_tokens.read(page_token, fingerprint, 1)
        before = None if position is None else position_count(position[0])
        await self._account(where.tenant_id)
        found = await self._store.ledger_entries(where, before, size + 1)
        items = found[:size]
        token = ""
        if len(found) > size:
            token = await self._page_tokens.make(fingerprint, [items[-1].entry_id])
        return Page(items, token)

    async def export_csv(
        self, tenant_id: str, start: datetime | None, end: datetime | None
    ) -> AsyncIterator[bytes]:
        """Checks the request, then returns the CSV chunks (an async iterator of bytes)."""
        if start is None:
            raise InvalidArgument("start_time", "is required")
        if end is None:
            raise InvalidArgument("end_time", "is required")
        where = UsageFilter(tenant_id, start, end)
        _check_usage_filter(where)
        await self._account(tenant_id)
        return self._csv_chunks(where)

    async def _csv_chunks(self, where: UsageFilter) -> AsyncIterator[bytes]:
        lines = _Lines()
        writer = csv.writer(lines, lineterminator="\r\n")
        writer.writerow(CSV_HEADER)
        after: RecordPosition | None = None
        while True:
            batch = await self._store.usage_records(where, after, EXPORT_BATCH, newest_first=False)
            for record in batch:
                writer.writerow(_csv_row(record))
                if lines.size >= CSV_CHUNK_BYTES:
                    yield lines.take()
            if len(batch) < EXPORT_BATCH:
                break
            after = RecordPosition(batch[-1].committed_at, batch[-1].hold_id)
        if lines.size:
            yield lines.take()

    async def _account(self, tenant_id: str) -> Account:
        account = await self._store.get_account(tenant_id)
        if account is None:
            raise NotFound(ErrorReason.TENANT_NOT_FOUND, f"tenant {tenant_id} does not exist")
        return account


def limit_used_basis_points(account: Account) -> int:
    """Exposure / effective credit limit in basis points, rounded down; 0 with no limit.

    Above 10,000 only when an operator lowered the limit under the current exposure.
    """
    limit = account.effective_credit_limit_micros
    if limit <= 0:
        return 0
    return min(account.exposure_micros * 10_000 // limit, BASIS_POINTS_MAX)


def summary_period(start: datetime | None, end: datetime | None, now: datetime) -> Period:
    """The period of a summary: UTC midnights, the current calendar month by default."""
    if start is None:
        start = _month_start(now.astimezone(UTC))
    else:
        _check_midnight("start_time", start)
    if end is None:
        if (start.year, start.month) == (MAXYEAR, 12):
            raise InvalidArgument("start_time", "must be before 9999-12-01 without an end_time")
        end = _next_month(start)
    else:
        _check_midnight("end_time", end)
    if end <= start:
        raise InvalidArgument("end_time", "must be after start_time")
    if end - start > timedelta(days=PERIOD_DAYS_MAX):
        raise InvalidArgument("end_time", f"must be at most {PERIOD_DAYS_MAX} days after start")
    return Period(start.astimezone(UTC), end.astimezone(UTC))


def _month_start(moment: datetime) -> datetime:
    return datetime(moment.year, moment.month, 1, tzinfo=UTC)


def _next_month(moment: datetime) -> datetime:
    moment = moment.astimezone(UTC)
    if moment.month == 12:
        return datetime(moment.year + 1, 1, 1, tzinfo=UTC)
    return datetime(moment.year, moment.month + 1, 1, tzinfo=UTC)


def _check_midnight(field: str, moment: datetime) -> None:
    moment = moment.astimezone(UTC)
    if (moment.hour, moment.minute, moment.second, moment.microsecond) != (0, 0, 0, 0):
        raise InvalidArgument(field, "must be a UTC midnight (summaries are read per UTC day)")


def _check_range(start: datetime | None, end: datetime | None) -> None:
    if start is not None and end is not None and end <= start:
        raise InvalidArgument("end_time", "must be after start_time")


def _check_usage_filter(where: UsageFilter) -> None:
    check_id("tenant_id", where.tenant_id)
    _check_range(where.start, where.end)
    if where.model:
        check_id("model", where.model)
    if where.user_id:
        check_id("user_id", where.user_id)


def _page_size(page_size: int) -> int:
    if page_size < 0:
        raise InvalidArgument("page_size", "must not be negative")
    if page_size == 0:
        return PAGE_SIZE_DEFAULT
    return min(page_size, PAGE_SIZE_MAX)


def _fingerprint(kind: str, where: UsageFilter | LedgerFilter) -> str:
    fields: dict[str, Any] = {"kind": kind}
    for name in where.__slots__:
        value = getattr(where, name)
        fields[name] = value.isoformat() if isinstance(value, datetime) else value
    return filters_fingerprint(**fields)


# CSV


class _Lines:
    """A file-like sink for csv.writer that hands its lines out as UTF-8 chunks."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.size = 0

    def write(self, line: str) -> int:
        encoded = line.encode()
        self._parts.append(encoded)
        self.size += len(encoded)
        return len(line)

    def take(self) -> bytes:
        chunk = b"".join(self._parts)
        self._parts.clear()
        self.size = 0
        return chunk


def iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _csv_row(record: UsageRecord) -> tuple[str | int, ...]:
    usage = record.usage
    return (
        record.hold_id,
        record.tenant_id,
        record.user_id,
        record.model,
        usage.input_tokens,
        usage.cached_input_tokens,
        usage.output_tokens,
        record.cost_micros,
        record.charged_micros,
        record.uncollected_micros,
        record.held_micros,
        record.payment_source.value,
        iso_utc(record.reserved_at),
        iso_utc(record.committed_at),
    )
