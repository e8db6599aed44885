"""Prices per model and the one rounding rule of the service.

The cost of a call is

    flat_micros_per_call + ceil((input x p_in + cached x p_cached + output x p_out) / 1,000,000)

where each p is a price in micros per million tokens. The variable part is rounded up once per
call, so the cost is never below the exact price and never off by more than one micro.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from billing_service.domain.money import AMOUNT_MICROS_MAX

TOKENS_PER_PRICE_UNIT = 1_000_000

# The most tokens of one kind a single call may report (a guard against overflow and typos).
TOKENS_MAX = 100_000_000

# $10,000 per million tokens: far above any real price, and low enough that the cost of
# TOKENS_MAX tokens of each kind (3 x 1e8 x 1e10) fits in a signed 64-bit integer, as the
# database computes it.
PRICE_MICROS_PER_MTOK_MAX = 10_000_000_000


class ModelBilling(StrEnum):
    INCLUDED = "included"
    METERED = "metered"


@dataclass(frozen=True, slots=True)
class TokenUsage:
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """What one model costs. Prices are micros per million tokens; the flat part per call."""

    model: str
    billing: ModelBilling
    input_micros_per_mtok: int = 0
    cached_input_micros_per_mtok: int = 0
    output_micros_per_mtok: int = 0
    flat_micros_per_call: int = 0

    def cost_micros(self, usage: TokenUsage) -> int:
        variable = (
            usage.input_tokens * self.input_micros_per_mtok
            + usage.cached_input_tokens * self.cached_input_micros_per_mtok
            + usage.output_tokens * self.output_micros_per_mtok
        )
        return self.flat_micros_per_call + ceil_div(variable, TOKENS_PER_PRICE_UNIT)

    def hold_micros(self, input_tokens: int, max_output_tokens: int) -> int:
        """The most a query of this size can cost: every input token priced uncached.

        Included models hold nothing. A metered hold is at least 1 micro, so a tenant without
        any available credit is never granted one.
        """
        if self.billing is ModelBilling.INCLUDED:
            return 0
        cost = self.cost_micros(
            TokenUsage(input_tokens=input_tokens, output_tokens=max_output_tokens)
        )
        return max(1, cost)

    def output_micros(self, output_tokens: int) -> int:
        """What an extension of a hold by `output_tokens` more output tokens adds: their price,
        rounded up on its own (0 for an included model). A hold grown by extensions therefore
        covers at least what one hold of the summed tokens would."""
        if self.billing is ModelBilling.INCLUDED:
            return 0
        return ceil_div(output_tokens * self.output_micros_per_mtok, TOKENS_PER_PRICE_UNIT)

    def covered_output_tokens(self, held_micros: int, usage: TokenUsage) -> int:
        """How many output tokens can be added to `usage` while its cost stays within
        `held_micros`: the largest n with cost(usage + n output tokens) <= held_micros, 0 when
        even `usage` costs more, and TOKENS_MAX when output costs nothing (an included model or
        no output price)."""
        if self.billing is ModelBilling.INCLUDED or self.output_micros_per_mtok == 0:
            return TOKENS_MAX
        # cost <= held  <=>  variable + n x p_out <= (held - flat) x 1e6, as ceil(y / d) <= k
        # <=> y <= k x d for integers.
        room = (held_micros - self.flat_micros_per_call) * TOKENS_PER_PRICE_UNIT - (
            usage.input_tokens * self.input_micros_per_mtok
            + usage.cached_input_tokens * self.cached_input_micros_per_mtok
            + usage.output_tokens * self.output_micros_per_mtok
        )
        if room < 0:
            return 0
        return min(TOKENS_MAX, room // self.output_micros_per_mtok)


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


class PriceTableError(ValueError):
    """The price table is malformed; the message names the model and field."""


@dataclass(frozen=True, slots=True)
class PriceTable:
    models: Mapping[str, ModelPrice]

    def get(self, model: str) -> ModelPrice | None:
        return self.models.get(model)


_PRICE_FIELDS = (
    "input_micros_per_mtok",
    "cached_input_micros_per_mtok",
    "output_micros_per_mtok",
    "flat_micros_per_call",
)


def parse_price_table(document: Mapping[str, Any]) -> PriceTable:
    """Builds a PriceTable from the parsed TOML document (see default_prices.toml)."""
    raw_models = document.get("models")
    if not isinstance(raw_models, Mapping) or not raw_models:
        raise PriceTableError("the price table needs a non-empty [models] table")
    models: dict[str, ModelPrice] = {}
    for name, entry in raw_models.items():
        if not isinstance(entry, Mapping):
            raise PriceTableError(f"models.{name}: must be a table")
        models[name] = _parse_model(str(name), entry)
    return PriceTable(models)


def _parse_model(name: str, entry: Mapping[str, Any]) -> ModelPrice:
    if not 1 <= len(name) <= 128:
        raise PriceTableError(f"models.{name}: a model name has 1 to 128 characters")
    unknown = set(entry) - {"billing", *_PRICE_FIELDS}
    if unknown:
        raise PriceTableError(f"models.{name}: unknown field(s) {sorted(unknown)}")
    try:
        billing = ModelBilling(entry.get("billing", ""))
    except ValueError:
        raise PriceTableError(f"models.{name}.billing: must be 'included' or 'metered'") from None
    prices: dict[str, int] = {}
    for field in _PRICE_FIELDS:
        value = entry.get(field, 0)
        # bool is an int subclass; a float is never a price.
        if not isinstance(value, int) or isinstance(value, bool):
            raise PriceTableError(f"models.{name}.{field}: must be an integer number of micros")
        limit = AMOUNT_MICROS_MAX if field == "flat_micros_per_call" else PRICE_MICROS_PER_MTOK_MAX
        if not 0 <= value <= limit:
            raise PriceTableError(f"models.{name}.{field}: must be between 0 and {limit}")
        prices[field] = value
    return ModelPrice(model=name, billing=billing, **prices)
