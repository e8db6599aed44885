"""Budget periods: UTC boundaries, reset times, and what a denial says."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from billing_service.domain.budgets import (
    EPOCH,
    Budget,
    BudgetPeriod,
    BudgetScope,
    BudgetUsage,
    exhausted_message,
    period_start,
    reset_time,
)


@pytest.mark.parametrize(
    ("period", "now", "start", "reset"),
    [
        (
            BudgetPeriod.DAY,
            datetime(2026, 3, 4, 23, 59, 59, 999999, UTC),
            (2026, 3, 4),
            (2026, 3, 5),
        ),
        (BudgetPeriod.DAY, datetime(2026, 3, 5, tzinfo=UTC), (2026, 3, 5), (2026, 3, 6)),
        # 2026-03-04 is a Wednesday; ISO weeks start on Monday.
        (BudgetPeriod.WEEK, datetime(2026, 3, 4, 8, tzinfo=UTC), (2026, 3, 2), (2026, 3, 9)),
        (BudgetPeriod.WEEK, datetime(2026, 3, 2, tzinfo=UTC), (2026, 3, 2), (2026, 3, 9)),
        (BudgetPeriod.WEEK, datetime(2026, 3, 1, 23, tzinfo=UTC), (2026, 2, 23), (2026, 3, 2)),
        (BudgetPeriod.MONTH, datetime(2026, 2, 28, 23, tzinfo=UTC), (2026, 2, 1), (2026, 3, 1)),
        (BudgetPeriod.MONTH, datetime(2026, 12, 31, 12, tzinfo=UTC), (2026, 12, 1), (2027, 1, 1)),
    ],
)
def test_periods_are_utc_days_iso_weeks_and_calendar_months(
    period: BudgetPeriod,
    now: datetime,
    start: tuple[int, int, int],
    reset: tuple[int, int, int],
) -> None:
    begun = period_start(period, now)
    assert begun == datetime(*start, tzinfo=UTC)
    assert reset_time(period, begun) == datetime(*reset, tzinfo=UTC)


def test_a_time_in_another_zone_is_placed_by_its_utc_day() -> None:
    # 01:00 on the 5th in UTC+2 is 23:00 on the 4th in UTC.
    local = datetime(2026, 3, 5, 1, tzinfo=timezone(timedelta(hours=2)))
    assert period_start(BudgetPeriod.DAY, local) == datetime(2026, 3, 4, tzinfo=UTC)


def test_a_budget_without_a_period_never_resets() -> None:
    assert period_start(BudgetPeriod.NONE, datetime(2026, 3, 4, tzinfo=UTC)) == EPOCH
    assert reset_time(BudgetPeriod.NONE, EPOCH) is None


def test_the_denial_says_what_remains_and_when_it_resets() -> None:
    budget = Budget("t", BudgetScope.USER, "alice", 1_000_000, BudgetPeriod.DAY)
    usage = BudgetUsage(budget, datetime(2026, 3, 4, tzinfo=UTC), 900_000, 50_000)
    assert usage.remaining_micros == 50_000
    assert not usage.fits(50_001)
    assert usage.fits(50_000)
    assert exhausted_message(usage, 60_000) == (
        "The day budget of user 'alice' is exhausted: this query needs $0.06, $0.05 of $1.00 "
        "remains. It resets at 2026-03-05T00:00:00Z."
    )
    lifetime = BudgetUsage(
        Budget("t", BudgetScope.API_KEY, "k", 1_000_000, BudgetPeriod.NONE), EPOCH, 1_200_000
    )
    assert exhausted_message(lifetime, 1) == (
        "The lifetime budget of API key 'k' is exhausted: this query needs $0.000001, $0.00 of "
        "$1.00 remains. It does not reset."
    )
