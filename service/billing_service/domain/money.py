"""Money is an int count of micro-units of the deployment's one currency (1 USD = 1,000,000).

No float is ever used for an amount. Every bound below is a hard limit checked at the edge.
"""

from __future__ import annotations

MICROS_PER_UNIT = 1_000_000

# $1,000,000: the largest single amount (hold, grant, refund, credit limit) accepted.
AMOUNT_MICROS_MAX = 1_000_000_000_000


def format_micros(amount_micros: int) -> str:
    """Renders micros as a currency string for humans, e.g. 1_234_567 -> "$1.234567".

    Trailing zeros of the fraction are trimmed down to cents ("$25.00", "$0.000125").
    """
    sign = "-" if amount_micros < 0 else ""
    units, micros = divmod(abs(amount_micros), MICROS_PER_UNIT)
    fraction = f"{micros:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}${units:,}.{fraction}"
