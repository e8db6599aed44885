"""Money as text: integer micros to dollars and back, exactly, without floats."""

from __future__ import annotations

import re

MICROS_PER_DOLLAR = 1_000_000

_DOLLARS = re.compile(r"\$?(\d{1,9})(?:\.(\d{1,6}))?")


def format_dollars(micros: int) -> str:
    """`$1,234.50`: at least cents, and every further digit that is not zero, so nothing is
    rounded away (11,000 micros is `$0.011`, 1 micro is `$0.000001`)."""
    sign = "-" if micros < 0 else ""
    dollars, fraction = divmod(abs(micros), MICROS_PER_DOLLAR)
    digits = f"{fraction:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}${dollars:,}.{digits}"


def parse_dollars(text: str) -> int:
    """`12.5` or `$12.50` to micros; at most 6 decimals (a micro), no sign, no exponent."""
    match = _DOLLARS.fullmatch(text.strip().replace(",", ""))
    if match is None:
        raise ValueError(f"not an amount in dollars (e.g. 12.50): {text!r}")
    dollars, fraction = match.group(1), match.group(2) or ""
    return int(dollars) * MICROS_PER_DOLLAR + int(fraction.ljust(6, "0"))


def format_basis_points(basis_points: int) -> str:
    """10,000 basis points are 100 %; shown with two decimals, as given (already rounded down)."""
    whole, hundredths = divmod(basis_points, 100)
    return f"{whole}.{hundredths:02d} %"
