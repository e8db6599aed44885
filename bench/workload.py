"""What one benchmark query is: the model, the prices, the token counts, the tenants.

The numbers are chosen so that a query is never denied and a commit never costs more than its
hold: the benchmark measures the common path (granted hold, settled within it), and the ledger
audit after each run must come back clean.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass

MODEL = "bench-metered"

# The benchmark's own price table (BILLING_PRICE_TABLE); one input token costs one micro.
PRICE_TABLE_TOML = f"""
[models."{MODEL}"]
billing = "metered"
input_micros_per_mtok = 1_000_000
cached_input_micros_per_mtok = 500_000
output_micros_per_mtok = 2_000_000
"""

# The estimate of every ReserveCredit: hold = 1200 x 1 + 800 x 2 = 2,800 micros.
ESTIMATE_INPUT_TOKENS = 1_200
ESTIMATE_MAX_OUTPUT_TOKENS = 800
HOLD_MICROS = 2_800
# The usage of every Commit: 1000 input + 200 cached + 1..800 output tokens, cost <= 2,700.
COMMIT_INPUT_TOKENS = 1_000
COMMIT_CACHED_INPUT_TOKENS = 200
COMMIT_MAX_OUTPUT_TOKENS = 800
# A streamed query (the `stream` load mode): the hold starts at the input and a first chunk of
# output, 1200 x 1 + 256 x 2 = 1,712 micros, and each ExtendHold adds one more chunk (512 micros).
# Its Commit has the usage above with 1..(first chunk + chunks extended) output tokens, so it too
# settles within the hold.
STREAM_FIRST_OUTPUT_TOKENS = 256
STREAM_CHUNK_TOKENS = 256
# Share of queries that release their hold (a failed model call) instead of committing.
RELEASE_SHARE = 0.10

# Every benchmark tenant: a payment method on file, a credit limit and a prepaid grant so large
# that no run can exhaust it (10^12 micros = $1,000,000, the largest amount the API accepts).
CREDIT_LIMIT_MICROS = 1_000_000_000_000
GRANT_MICROS = 1_000_000_000_000

HOT_PREFIX = "hot-"
HOT_TENANT = f"{HOT_PREFIX}1"
SPREAD_PREFIX = "zipf-"
PGBENCH_PREFIX = "pgb-"
DEFAULT_ZIPF_S = 1.1  # pgbench's random_zipfian needs an exponent above 1.0


@dataclass(frozen=True)
class TenantChoice:
    """How callers pick the tenant of each call: one hot tenant, or Zipf over many."""

    prefix: str
    count: int  # 1: always `prefix1`
    zipf_s: float = DEFAULT_ZIPF_S

    @property
    def hot(self) -> bool:
        return self.count == 1

    def tenant_ids(self) -> list[str]:
        return [f"{self.prefix}{k}" for k in range(1, self.count + 1)]


class TenantPicker:
    """Draws tenant ids with P(k) proportional to k^-s, k = 1..count (bounded Zipf law)."""

    def __init__(self, choice: TenantChoice, rng: random.Random) -> None:
        self._ids = choice.tenant_ids()
        weights = (k**-choice.zipf_s for k in range(1, choice.count + 1))
        self._cumulative = list(itertools.accumulate(weights))
        self._rng = rng

    def pick(self) -> str:
        if len(self._ids) == 1:
            return self._ids[0]
        point = self._rng.random() * self._cumulative[-1]
        index = bisect.bisect_right(self._cumulative, point)
        return self._ids[min(index, len(self._ids) - 1)]


def hot_choice() -> TenantChoice:
    return TenantChoice(HOT_PREFIX, 1)


def spread_choice(count: int, zipf_s: float) -> TenantChoice:
    return TenantChoice(SPREAD_PREFIX, count, zipf_s)
