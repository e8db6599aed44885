"""The one rounding rule, holds, and the price table parser."""

from __future__ import annotations

import tomllib
from fractions import Fraction
from importlib import resources
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing_service.domain.money import AMOUNT_MICROS_MAX
from billing_service.domain.pricing import (
    PRICE_MICROS_PER_MTOK_MAX,
    TOKENS_MAX,
    ModelBilling,
    ModelPrice,
    PriceTableError,
    TokenUsage,
    ceil_div,
    parse_price_table,
)

tokens = st.integers(min_value=0, max_value=TOKENS_MAX)
prices = st.integers(min_value=0, max_value=PRICE_MICROS_PER_MTOK_MAX)
# Real prices are small; the full range is covered too, but most examples should look real.
realistic_prices = st.one_of(st.integers(min_value=0, max_value=100_000_000), prices)
flats = st.integers(min_value=0, max_value=AMOUNT_MICROS_MAX)


@st.composite
def model_prices(draw: st.DrawFn, billing: ModelBilling = ModelBilling.METERED) -> ModelPrice:
    return ModelPrice(
        model="m",
        billing=billing,
        input_micros_per_mtok=draw(realistic_prices),
        cached_input_micros_per_mtok=draw(realistic_prices),
        output_micros_per_mtok=draw(realistic_prices),
        flat_micros_per_call=draw(st.one_of(st.just(0), flats)),
    )


usages = st.builds(TokenUsage, tokens, tokens, tokens)


def exact_variable_cost(price: ModelPrice, usage: TokenUsage) -> Fraction:
    return Fraction(
        usage.input_tokens * price.input_micros_per_mtok
        + usage.cached_input_tokens * price.cached_input_micros_per_mtok
        + usage.output_tokens * price.output_micros_per_mtok,
        1_000_000,
    )


# The cost rule


@given(model_prices(), usages)
def test_cost_is_the_flat_price_plus_the_exact_variable_price_rounded_up_once(
    price: ModelPrice, usage: TokenUsage
) -> None:
    cost = price.cost_micros(usage)
    exact = exact_variable_cost(price, usage)
    variable = cost - price.flat_micros_per_call

    assert isinstance(cost, int)
    assert cost >= 0
    assert variable >= exact  # never below the exact price
    assert variable < exact + 1  # never a whole micro above it
    assert cost >= price.flat_micros_per_call


@given(model_prices(), usages, st.sampled_from(["input", "cached", "output"]), tokens)
def test_cost_is_monotone_in_each_token_count(
    price: ModelPrice, usage: TokenUsage, kind: str, extra: int
) -> None:
    if kind == "input":
        more = TokenUsage(
            min(TOKENS_MAX, usage.input_tokens + extra),
            usage.cached_input_tokens,
            usage.output_tokens,
        )
    elif kind == "cached":
        more = TokenUsage(
            usage.input_tokens,
            min(TOKENS_MAX, usage.cached_input_tokens + extra),
            usage.output_tokens,
        )
    else:
        more = TokenUsage(
            usage.input_tokens,
            usage.cached_input_tokens,
            min(TOKENS_MAX, usage.output_tokens + extra),
        )
    assert price.cost_micros(more) >= price.cost_micros(usage)


@given(model_prices(), usages)
def test_the_largest_cost_fits_in_int64(price: ModelPrice, usage: TokenUsage) -> None:
    assert price.cost_micros(usage) < 2**63


@given(st.integers(min_value=0, max_value=10**30), st.integers(min_value=1, max_value=10**12))
def test_ceil_div_is_the_ceiling_of_the_exact_quotient(numerator: int, denominator: int) -> None:
    quotient = ceil_div(numerator, denominator)
    assert quotient - 1 < Fraction(numerator, denominator) <= quotient


SONNET = ModelPrice(
    "claude-sonnet-4-5",
    ModelBilling.METERED,
    input_micros_per_mtok=3_000_000,
    cached_input_micros_per_mtok=300_000,
    output_micros_per_mtok=15_000_000,
)
MINI = ModelPrice(
    "gpt-4o-mini",
    ModelBilling.INCLUDED,
    input_micros_per_mtok=150_000,
    cached_input_micros_per_mtok=75_000,
    output_micros_per_mtok=600_000,
)
PREMIUM = ModelPrice(
    "gpt-4o-premium",
    ModelBilling.METERED,
    input_micros_per_mtok=2_500_000,
    cached_input_micros_per_mtok=1_250_000,
    output_micros_per_mtok=10_000_000,
    flat_micros_per_call=500_000,
)


@pytest.mark.parametrize(
    ("price", "usage", "expected"),
    [
        # 900 x 3 + 100 x 0.3 + 400 x 15 = 2,700 + 30 + 6,000
        (SONNET, TokenUsage(900, 100, 400), 8_730),
        (SONNET, TokenUsage(0, 0, 0), 0),
        # 1 input token costs 3 micros exactly: no rounding.
        (SONNET, TokenUsage(1, 0, 0), 3),
        # 1 cached token costs 0.3 micros: rounded up to 1.
        (SONNET, TokenUsage(0, 1, 0), 1),
        # 3 cached tokens: 0.9 -> 1; 4: 1.2 -> 2; 10: exactly 3.
        (SONNET, TokenUsage(0, 3, 0), 1),
        (SONNET, TokenUsage(0, 4, 0), 2),
        (SONNET, TokenUsage(0, 10, 0), 3),
        # Rounded once per call, not per kind: 0.3 + 0.3 would be 2 if rounded per kind.
        (
            ModelPrice("x", ModelBilling.METERED, 300_000, 300_000, 0),
            TokenUsage(1, 1, 0),
            1,
        ),
        # gpt-4o-mini: 1,000 x 0.15 + 200 x 0.075 + 512 x 0.6 = 150 + 15 + 307.2 -> 473
        (MINI, TokenUsage(1_000, 200, 512), 473),
        # The README's example: gpt-4o, 1,000 + 200 cached + 512 = 2,500 + 250 + 5,120
        (
            ModelPrice("gpt-4o", ModelBilling.METERED, 2_500_000, 1_250_000, 10_000_000),
            TokenUsage(1_000, 200, 512),
            7_870,
        ),
        # A flat price per call is added whole, on top of the rounded variable part.
        (PREMIUM, TokenUsage(0, 0, 0), 500_000),
        (PREMIUM, TokenUsage(1, 0, 0), 500_003),  # 2.5 -> 3
        (PREMIUM, TokenUsage(1_000_000, 0, 1_000_000), 13_000_000),
        # The largest call: 10^8 tokens of each kind at the highest price.
        (
            ModelPrice(
                "max",
                ModelBilling.METERED,
                PRICE_MICROS_PER_MTOK_MAX,
                PRICE_MICROS_PER_MTOK_MAX,
                PRICE_MICROS_PER_MTOK_MAX,
                AMOUNT_MICROS_MAX,
            ),
            TokenUsage(TOKENS_MAX, TOKENS_MAX, TOKENS_MAX),
            3 * 1_000_000_000_000 + AMOUNT_MICROS_MAX,
        ),
    ],
)
def test_worked_examples(price: ModelPrice, usage: TokenUsage, expected: int) -> None:
    assert price.cost_micros(usage) == expected


# Holds


@given(model_prices(), tokens, st.integers(min_value=1, max_value=TOKENS_MAX))
def test_a_metered_hold_is_the_uncached_cost_of_the_estimate_and_at_least_one_micro(
    price: ModelPrice, input_tokens: int, max_output_tokens: int
) -> None:
    hold = price.hold_micros(input_tokens, max_output_tokens)
    uncached = price.cost_micros(TokenUsage(input_tokens, 0, max_output_tokens))
    assert hold == max(1, uncached)
    assert hold >= 1
    # The hold covers any real usage within the estimate when the cached price is not above the
    # uncached one (every real price table): cached tokens are part of the input tokens.
    if price.cached_input_micros_per_mtok <= price.input_micros_per_mtok:
        half = input_tokens // 2
        actual = TokenUsage(input_tokens - half, half, max_output_tokens)
        assert price.cost_micros(actual) <= hold


@given(model_prices(ModelBilling.INCLUDED), tokens, st.integers(min_value=1, max_value=TOKENS_MAX))
def test_an_included_model_holds_nothing(
    price: ModelPrice, input_tokens: int, max_output_tokens: int
) -> None:
    assert price.hold_micros(input_tokens, max_output_tokens) == 0


def test_hold_examples() -> None:
    assert SONNET.hold_micros(1_000, 500) == 3_000 + 7_500
    # A free model still holds 1 micro, so a tenant with nothing available is never granted it.
    free = ModelPrice("free", ModelBilling.METERED)
    assert free.hold_micros(0, 1) == 1
    assert free.hold_micros(TOKENS_MAX, TOKENS_MAX) == 1
    assert PREMIUM.hold_micros(0, 1) == 500_010
    assert MINI.hold_micros(1_000_000, 1_000_000) == 0


# The price table


def _table(**fields: Any) -> dict[str, Any]:
    return {"models": {"m": {"billing": "metered", **fields}}}


def test_a_minimal_table_parses_with_zero_defaults() -> None:
    table = parse_price_table({"models": {"m": {"billing": "included"}}})
    assert table.get("m") == ModelPrice("m", ModelBilling.INCLUDED, 0, 0, 0, 0)
    assert table.get("other") is None


def test_a_full_entry_parses() -> None:
    table = parse_price_table(
        _table(
            input_micros_per_mtok=1,
            cached_input_micros_per_mtok=2,
            output_micros_per_mtok=PRICE_MICROS_PER_MTOK_MAX,
            flat_micros_per_call=AMOUNT_MICROS_MAX,
        )
    )
    assert table.get("m") == ModelPrice(
        "m", ModelBilling.METERED, 1, 2, PRICE_MICROS_PER_MTOK_MAX, AMOUNT_MICROS_MAX
    )


_PRICE_FIELDS = [
    "input_micros_per_mtok",
    "cached_input_micros_per_mtok",
    "output_micros_per_mtok",
    "flat_micros_per_call",
]


@pytest.mark.parametrize("field", _PRICE_FIELDS)
@pytest.mark.parametrize("value", [1.0, 2.5, True, False, "100", None, [1]])
def test_a_price_that_is_not_an_integer_is_rejected_naming_the_field(
    field: str, value: object
) -> None:
    with pytest.raises(PriceTableError, match=rf"^models\.m\.{field}: must be an integer"):
        parse_price_table(_table(**{field: value}))


@pytest.mark.parametrize("field", _PRICE_FIELDS)
def test_a_negative_price_is_rejected_naming_the_field(field: str) -> None:
    with pytest.raises(PriceTableError, match=rf"^models\.m\.{field}: must be between 0 and "):
        parse_price_table(_table(**{field: -1}))


@pytest.mark.parametrize(
    ("field", "limit"),
    [
        ("input_micros_per_mtok", PRICE_MICROS_PER_MTOK_MAX),
        ("cached_input_micros_per_mtok", PRICE_MICROS_PER_MTOK_MAX),
        ("output_micros_per_mtok", PRICE_MICROS_PER_MTOK_MAX),
        ("flat_micros_per_call", AMOUNT_MICROS_MAX),
    ],
)
def test_a_price_above_its_bound_is_rejected_naming_the_field(field: str, limit: int) -> None:
    parse_price_table(_table(**{field: limit}))
    with pytest.raises(
        PriceTableError, match=rf"^models\.m\.{field}: must be between 0 and {limit}"
    ):
        parse_price_table(_table(**{field: limit + 1}))


def test_an_unknown_field_is_rejected_by_name() -> None:
    with pytest.raises(PriceTableError, match=r"^models\.m: unknown field\(s\) \['input_price'\]"):
        parse_price_table(_table(input_price=1))


@pytest.mark.parametrize("billing", ["", "Metered", "free", 1, None])
def test_a_bad_billing_is_rejected_naming_the_field(billing: object) -> None:
    with pytest.raises(PriceTableError, match=r"^models\.m\.billing: must be 'included' or"):
        parse_price_table({"models": {"m": {"billing": billing}}})


def test_a_missing_billing_is_rejected() -> None:
    with pytest.raises(PriceTableError, match=r"^models\.m\.billing: "):
        parse_price_table({"models": {"m": {"input_micros_per_mtok": 1}}})


@pytest.mark.parametrize("document", [{}, {"models": {}}, {"models": 3}, {"models": []}])
def test_a_table_without_models_is_rejected(document: dict[str, Any]) -> None:
    with pytest.raises(PriceTableError, match=r"non-empty \[models\]"):
        parse_price_table(document)


def test_a_model_that_is_not_a_table_is_rejected() -> None:
    with pytest.raises(PriceTableError, match=r"^models\.m: must be a table"):
        parse_price_table({"models": {"m": 5}})


@pytest.mark.parametrize("name", ["", "x" * 129])
def test_a_model_name_must_have_1_to_128_characters(name: str) -> None:
    with pytest.raises(PriceTableError, match="a model name has 1 to 128 characters"):
        parse_price_table({"models": {name: {"billing": "metered"}}})


def test_a_float_in_toml_is_rejected() -> None:
    document = tomllib.loads('[models."m"]\nbilling = "metered"\ninput_micros_per_mtok = 2.5\n')
    with pytest.raises(PriceTableError, match=r"^models\.m\.input_micros_per_mtok: "):
        parse_price_table(document)


def test_the_shipped_price_table_parses() -> None:
    text = resources.files("billing_service").joinpath("default_prices.toml").read_text()
    table = parse_price_table(tomllib.loads(text))
    assert set(table.models) >= {"gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5", "gpt-4o-premium"}
    for name, price in table.models.items():
        assert price.model == name
    assert table.get("gpt-4o") == ModelPrice(
        "gpt-4o", ModelBilling.METERED, 2_500_000, 1_250_000, 10_000_000, 0
    )
    assert table.get("gpt-4o-mini") == MINI
    assert table.get("gpt-4o-premium") == PREMIUM
    # Every shipped cached price is at most the uncached one, so an estimate's hold covers it.
    for price in table.models.values():
        assert price.cached_input_micros_per_mtok <= price.input_micros_per_mtok


# Holds that grow (ExtendHold)


@given(model_prices(), tokens, st.integers(1, TOKENS_MAX), st.integers(1, TOKENS_MAX))
def test_a_hold_grown_by_extensions_covers_what_one_hold_of_the_sum_would(
    price: ModelPrice, input_tokens: int, first: int, more: int
) -> None:
    grown = price.hold_micros(input_tokens, first) + price.output_micros(more)
    assert grown >= price.hold_micros(input_tokens, first + more)
    # Rounded up once per extension: never more than one micro above it per extension.
    assert grown <= price.hold_micros(input_tokens, first + more) + 1


@given(model_prices(), tokens)
def test_an_extension_is_the_price_of_its_output_tokens_rounded_up(
    price: ModelPrice, output_tokens: int
) -> None:
    exact = Fraction(output_tokens * price.output_micros_per_mtok, 1_000_000)
    assert exact <= price.output_micros(output_tokens) < exact + 1


@given(
    model_prices(),
    st.integers(0, 10**13),
    st.builds(TokenUsage, tokens, tokens, tokens),
)
def test_covered_output_tokens_is_the_most_that_still_fits_in_the_hold(
    price: ModelPrice, held: int, usage: TokenUsage
) -> None:
    covered = price.covered_output_tokens(held, usage)
    assert 0 <= covered <= TOKENS_MAX
    if price.output_micros_per_mtok == 0:
        assert covered == TOKENS_MAX
        return

    def with_more(more: int) -> TokenUsage:
        return TokenUsage(usage.input_tokens, usage.cached_input_tokens, usage.output_tokens + more)

    if price.cost_micros(usage) > held:
        assert covered == 0
        return
    assert price.cost_micros(with_more(covered)) <= held
    if covered < TOKENS_MAX:
        assert price.cost_micros(with_more(covered + 1)) > held


def test_an_included_model_covers_any_count_and_its_extension_costs_nothing() -> None:
    price = ModelPrice("free", ModelBilling.INCLUDED, output_micros_per_mtok=5_000_000)
    assert price.output_micros(1_000) == 0
    assert price.covered_output_tokens(0, TokenUsage(10, 0, 10)) == TOKENS_MAX
