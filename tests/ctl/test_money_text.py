"""Money as the CLI writes and reads it: exact, integer micros to dollars and back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.ctl.money import format_basis_points, format_dollars, parse_dollars


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (0, "$0.00"),
        (1, "$0.000001"),
        (10_000, "$0.01"),
        (11_000, "$0.011"),
        (25_000_000, "$25.00"),
        (1_234_567_890, "$1,234.56789"),
        (-3_500_001, "-$3.500001"),
        (1_000_000_000_000, "$1,000,000.00"),
    ],
)
def test_format_dollars(micros: int, text: str) -> None:
    assert format_dollars(micros) == text


@pytest.mark.parametrize(
    ("text", "micros"),
    [("12", 12_000_000), ("12.5", 12_500_000), ("$0.000001", 1), ("1,000.25", 1_000_250_000)],
)
def test_parse_dollars(text: str, micros: int) -> None:
    assert parse_dollars(text) == micros


@pytest.mark.parametrize("text", ["", "1.0000001", "-1", "1e3", "one", "1.", ".5", "$"])
def test_parse_dollars_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not an amount"):
        parse_dollars(text)


@given(st.integers(min_value=0, max_value=999_999_999_999_999))
def test_what_is_printed_reads_back_the_same(micros: int) -> None:
    assert parse_dollars(format_dollars(micros)) == micros


@pytest.mark.parametrize(("bp", "text"), [(0, "0.00 %"), (5, "0.05 %"), (4_837, "48.37 %")])
def test_format_basis_points(bp: int, text: str) -> None:
    assert format_basis_points(bp) == text
