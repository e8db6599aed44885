"""The dashboard's rules on their own: default periods, their bounds, the share of the limit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from billing_service.domain.errors import InvalidArgument
from billing_service.domain.model import Account, TenantStatus
from billing_service.usage import limit_used_basis_points, summary_period

NOW = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)


def test_the_default_period_is_the_calendar_month_in_utc() -> None:
    period = summary_period(None, None, NOW)
    assert (period.start, period.end) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    # 20:00 on Dec 31st in New York is already January 1st in UTC.
    new_york = datetime(2027, 1, 1, 1, tzinfo=UTC).astimezone(ZoneInfo("America/New_York"))
    assert summary_period(None, None, new_york).start == datetime(2027, 1, 1, tzinfo=UTC)


def test_a_midnight_in_another_zone_is_not_a_utc_midnight() -> None:
    paris_midnight = datetime(2026, 6, 1, tzinfo=UTC) - timedelta(hours=2)
    with pytest.raises(InvalidArgument) as raised:
        summary_period(paris_midnight, None, NOW)
    assert raised.value.field == "start_time"


@pytest.mark.parametrize(
    ("exposure", "limit", "card", "expected"),
    [
        (0, 1_000_000, True, 0),
        (1, 1_000_000, True, 0),
        (99, 1_000_000, True, 0),
        (100, 1_000_000, True, 1),
        (999_999, 1_000_000, True, 9_999),
        (1_000_000, 1_000_000, True, 10_000),
        (500, 0, True, 0),
        (500, 1_000_000, False, 0),
        (10**12, 1, True, 2**31 - 1),
    ],
)
def test_the_share_of_the_limit_is_rounded_down(
    exposure: int, limit: int, card: bool, expected: int
) -> None:
    account = Account("t", TenantStatus.ACTIVE, limit, card, balance_micros=-exposure)
    assert limit_used_basis_points(account) == expected
