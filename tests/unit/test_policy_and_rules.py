"""The pure rules: access decisions, settlement, hold state checks, validation, fingerprints."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from billing_service.domain.commands import (
    CheckAccess,
    Commit,
    CreateTenant,
    GrantCredit,
    QueryEstimate,
    Refund,
    Release,
    Reserve,
    TtlBounds,
    UpdateTenant,
    fingerprint,
    validate_check_access,
    validate_commit,
    validate_create_tenant,
    validate_grant,
    validate_refund,
    validate_release,
    validate_reserve,
    validate_update_tenant,
)
from billing_service.domain.errors import (
    BillingError,
    ErrorReason,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from billing_service.domain.ledger import (
    ReleaseAction,
    Settlement,
    check_committable,
    check_refundable,
    covered_by_hold,
    decide_release,
    extended,
    extension_answer,
    held_by,
    held_micros,
    is_live,
    refund_amount,
    require_reservation,
    settle,
)
from billing_service.domain.model import (
    Account,
    Balance,
    DenialReason,
    Hold,
    HoldStatus,
    TenantStatus,
    lifted_by_top_up,
)
from billing_service.domain.money import AMOUNT_MICROS_MAX, format_micros
from billing_service.domain.policy import Decision, decide, explain_refusal
from billing_service.domain.pricing import TOKENS_MAX, ModelBilling, ModelPrice, TokenUsage

METERED = ModelPrice("gpt-4o", ModelBilling.METERED, 2_500_000, 1_250_000, 10_000_000)
INCLUDED = ModelPrice("gpt-4o-mini", ModelBilling.INCLUDED, 150_000, 75_000, 600_000)
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
RSV = "rsv_" + "0123456789abcdef" * 2


def account(
    *,
    balance: int = 0,
    held: int = 0,
    limit: int = 25_000_000,
    card: bool = True,
    status: TenantStatus = TenantStatus.ACTIVE,
) -> Account:
    return Account("t", status, limit, card, balance_micros=balance, held_micros=held)


def hold(
    *,
    amount: int = 10_000,
    price: ModelPrice | None = METERED,
    status: HoldStatus = HoldStatus.OPEN,
    expires_at: datetime = NOW + timedelta(minutes=5),
    refunded: int = 0,
) -> Hold:
    return Hold(
        hold_id=RSV,
        request_id="r",
        request_fingerprint="f",
        tenant_id="t",
        user_id="u",
        model="gpt-4o",
        price=price,
        amount_micros=amount,
        status=status,
        created_at=NOW,
        expires_at=expires_at,
        decision_available_micros=0,
        refunded_micros=refunded,
    )


# Accounts


def test_account_arithmetic() -> None:
    with_card = account(balance=-3_000_000, held=2_000_000)
    assert with_card.effective_credit_limit_micros == 25_000_000
    assert with_card.available_micros == -3_000_000 + 25_000_000 - 2_000_000
    assert with_card.exposure_micros == 5_000_000
    without_card = account(balance=1_000_000, held=400_000, card=False)
    assert without_card.effective_credit_limit_micros == 0
    assert without_card.available_micros == 600_000
    assert without_card.exposure_micros == 0  # prepaid credit covers the holds
    assert Balance.of(with_card) == Balance(-3_000_000, 2_000_000, 25_000_000)
    assert Balance.of(with_card).available_micros == with_card.available_micros
    assert Balance.of(with_card).exposure_micros == with_card.exposure_micros


# decide()


def test_a_model_not_in_the_price_table_is_not_offered_even_to_a_suspended_tenant() -> None:
    for who in (account(), account(status=TenantStatus.SUSPENDED)):
        decision = decide(who, "gpt-9", None, 123)
        assert decision == Decision(
            allowed=False,
            reason=DenialReason.MODEL_NOT_OFFERED,
            message="The model 'gpt-9' is not offered.",
            available_micros=25_000_000,
            billing=None,
            required_micros=0,
        )


@pytest.mark.parametrize("price", [METERED, INCLUDED])
def test_a_suspended_tenant_is_denied_every_model(price: ModelPrice) -> None:
    decision = decide(account(status=TenantStatus.SUSPENDED, balance=10**9), "m", price, 1)
    assert not decision.allowed
    assert decision.reason is DenialReason.ACCOUNT_SUSPENDED
    assert decision.message == "This account is suspended. Contact support to restore access."
    assert decision.billing is price.billing
    assert decision.required_micros == 1


def test_an_included_model_needs_no_credit() -> None:
    broke = account(balance=-25_000_000, card=True)
    assert broke.available_micros == 0
    decision = decide(account(card=False), "gpt-4o-mini", INCLUDED, 0)
    assert decision == Decision(True, None, "", 0, ModelBilling.INCLUDED, 0)
    assert decide(broke, "gpt-4o-mini", INCLUDED, 0).allowed


def test_a_metered_hold_fits_up_to_the_last_micro() -> None:
    who = account(balance=-20_000_000, held=4_000_000)  # 1,000,000 available
    fits = decide(who, "gpt-4o", METERED, 1_000_000)
    assert fits == Decision(True, None, "", 1_000_000, ModelBilling.METERED, 1_000_000)
    over = decide(who, "gpt-4o", METERED, 1_000_001)
    assert not over.allowed
    assert over.reason is DenialReason.CREDIT_LIMIT_REACHED
    assert over.message == (
        "Credit limit reached: this query needs $1.000001, $1.00 is available. "
        "Top up or wait for pending charges to settle."
    )
    assert over.available_micros == 1_000_000
    assert over.required_micros == 1_000_001
    assert over.billing is ModelBilling.METERED


def test_without_a_card_only_prepaid_credit_counts() -> None:
    prepaid = account(balance=500_000, held=100_000, card=False)
    assert decide(prepaid, "gpt-4o", METERED, 400_000).allowed
    denied = decide(prepaid, "gpt-4o", METERED, 400_001)
    assert denied.reason is DenialReason.PAYMENT_METHOD_REQUIRED
    assert denied.message == "Add a payment method to use gpt-4o."
    assert denied.available_micros == 400_000
    nothing = decide(account(card=False), "gpt-4o", METERED, 1)
    assert nothing.reason is DenialReason.PAYMENT_METHOD_REQUIRED


def test_a_negative_available_credit_is_shown_as_zero_in_the_message() -> None:
    lowered = account(balance=-10_000_000, limit=5_000_000)
    denied = decide(lowered, "gpt-4o", METERED, 1)
    assert denied.available_micros == -5_000_000
    assert "$0.000001, $0.00 is available" in denied.message


@given(
    balance=st.integers(-(10**12), 10**12),
    held=st.integers(0, 10**12),
    limit=st.integers(0, 10**12),
    card=st.booleans(),
    required=st.integers(1, 10**12),
)
def test_a_metered_decision_allows_exactly_what_fits(
    balance: int, held: int, limit: int, card: bool, required: int
) -> None:
    who = account(balance=balance, held=held, limit=limit, card=card)
    decision = decide(who, "gpt-4o", METERED, required)
    assert decision.allowed == (required <= who.available_micros)
    assert decision.available_micros == who.available_micros
    if not decision.allowed:
        expected = (
            DenialReason.CREDIT_LIMIT_REACHED if card else DenialReason.PAYMENT_METHOD_REQUIRED
        )
        assert decision.reason is expected
        assert decision.message


# explain_refusal()


def test_explain_refusal_repeats_a_denial() -> None:
    suspended = account(status=TenantStatus.SUSPENDED)
    assert explain_refusal(suspended, "gpt-4o", METERED, 5) == decide(
        suspended, "gpt-4o", METERED, 5
    )
    full = account(held=25_000_000)
    assert explain_refusal(full, "gpt-4o", METERED, 5).reason is DenialReason.CREDIT_LIMIT_REACHED


@pytest.mark.parametrize(
    ("card", "reason"),
    [(True, DenialReason.CREDIT_LIMIT_REACHED), (False, DenialReason.PAYMENT_METHOD_REQUIRED)],
)
def test_explain_refusal_never_turns_a_refusal_into_an_allowance(
    card: bool, reason: DenialReason
) -> None:
    # The database refused, then another call freed credit before the account was re-read.
    roomy = account(balance=1_000_000, card=card)
    refusal = explain_refusal(roomy, "gpt-4o", METERED, 5)
    assert not refusal.allowed
    assert refusal.reason is reason
    assert refusal.available_micros == roomy.available_micros
    assert refusal.required_micros == 5
    assert refusal.billing is ModelBilling.METERED


# settle()


def test_settle_within_the_hold_charges_the_cost() -> None:
    assert settle(hold(amount=10_000), 8_730, 0) == Settlement(8_730, 0)
    assert settle(hold(amount=10_000), 10_000, -5) == Settlement(10_000, 0)
    assert settle(hold(amount=10_000), 0, 0) == Settlement(0, 0)


def test_settle_above_the_hold_charges_what_still_fits() -> None:
    assert settle(hold(amount=10_000), 15_000, 100_000) == Settlement(15_000, 0)
    assert settle(hold(amount=10_000), 15_000, 5_000) == Settlement(15_000, 0)
    assert settle(hold(amount=10_000), 15_000, 4_999) == Settlement(14_999, 1)
    assert settle(hold(amount=10_000), 15_000, 0) == Settlement(10_000, 5_000)
    # A lowered limit never reduces what the granted hold covers.
    assert settle(hold(amount=10_000), 15_000, -1_000_000) == Settlement(10_000, 5_000)


def test_settle_charges_nothing_for_an_included_model() -> None:
    assert settle(hold(amount=0, price=INCLUDED), 473, 0) == Settlement(0, 0)


@given(
    amount=st.integers(1, AMOUNT_MICROS_MAX),
    cost=st.integers(0, 4 * 10**13),
    available=st.integers(-(10**13), 10**13),
)
def test_settle_properties(amount: int, cost: int, available: int) -> None:
    result = settle(hold(amount=amount), cost, available)
    assert result.charged_micros + result.uncollected_micros == cost
    assert 0 <= result.charged_micros <= amount + max(0, available)
    assert result.uncollected_micros >= 0
    # Up to the hold is always charged.
    assert result.charged_micros >= min(cost, amount)
    if cost <= amount:
        assert result == Settlement(cost, 0)
    # Nothing is left uncollected while credit remains.
    if result.uncollected_micros:
        assert result.charged_micros == amount + max(0, available)
    # Releasing the hold and charging never takes a tenant from within its cap to beyond it.
    available_after = available + amount - result.charged_micros
    assert available_after >= min(0, available)


@given(
    amount=st.integers(0, AMOUNT_MICROS_MAX),
    cost=st.integers(0, 4 * 10**13),
    available=st.integers(-(10**13), 10**13),
)
def test_a_cost_covered_by_the_hold_settles_the_same_whatever_the_credit(
    amount: int, cost: int, available: int
) -> None:
    metered = hold(amount=amount)
    assert covered_by_hold(metered, cost) == (cost <= amount)
    if covered_by_hold(metered, cost):
        assert settle(metered, cost, available) == settle(metered, cost, 0) == Settlement(cost, 0)


def test_only_a_metered_hold_keeps_credit() -> None:
    assert held_micros(hold(amount=10_000)) == 10_000
    assert held_micros(hold(amount=0)) == 0
    assert held_micros(hold(amount=10_000, price=INCLUDED)) == 0
    assert held_micros(hold(amount=10_000, price=None)) == 0


@given(
    amount=st.integers(0, AMOUNT_MICROS_MAX),
    billing=st.sampled_from([*ModelBilling, None]),
)
def test_what_a_hold_row_gives_back_is_what_its_hold_keeps(
    amount: int, billing: ModelBilling | None
) -> None:
    price = None if billing is None else dataclasses.replace(METERED, billing=billing)
    assert held_by(billing, amount) == held_micros(hold(amount=amount, price=price))


@pytest.mark.parametrize("reason", [*DenialReason, None])
def test_only_a_lack_of_credit_is_lifted_by_a_top_up(reason: DenialReason | None) -> None:
    assert lifted_by_top_up(reason) == (reason is DenialReason.CREDIT_LIMIT_REACHED)


@given(
    amount=st.integers(0, AMOUNT_MICROS_MAX),
    more=st.lists(st.integers(0, 10**9), min_size=1, max_size=4),
    ttl_seconds=st.integers(1, 3_600),
    step_seconds=st.integers(0, 3_600),
)
def test_an_extended_hold_grows_and_remembers_how_it_was_granted(
    amount: int, more: list[int], ttl_seconds: int, step_seconds: int
) -> None:
    granted = hold(amount=amount)
    grown = granted
    now = NOW
    for micros in more:
        before = grown
        grown = extended(grown, micros, now, timedelta(seconds=ttl_seconds))
        assert grown.amount_micros == before.amount_micros + micros
        assert grown.expires_at == max(before.expires_at, now + timedelta(seconds=ttl_seconds))
        now += timedelta(seconds=step_seconds)
    assert grown.extended_micros == sum(more)
    assert grown.as_granted() == granted
    answer = extension_answer(grown, grown.amount_micros, grown.expires_at)
    assert answer.status is HoldStatus.OPEN
    assert (answer.amount_micros, answer.expires_at) == (grown.amount_micros, grown.expires_at)


# Hold state checks


def test_check_committable_returns_an_open_unexpired_hold() -> None:
    open_hold = hold()
    assert check_committable(open_hold, RSV, NOW) is open_hold


@pytest.mark.parametrize(
    ("found", "error", "reason"),
    [
        (None, NotFound, ErrorReason.RESERVATION_NOT_FOUND),
        (hold(status=HoldStatus.DENIED), NotFound, ErrorReason.RESERVATION_NOT_FOUND),
        (hold(status=HoldStatus.COMMITTED), FailedPrecondition, ErrorReason.HOLD_ALREADY_COMMITTED),
        (hold(status=HoldStatus.RELEASED), FailedPrecondition, ErrorReason.HOLD_RELEASED),
        (hold(status=HoldStatus.EXPIRED), FailedPrecondition, ErrorReason.HOLD_EXPIRED),
        # Still open but past its expire time: the sweeper has not come by yet.
        (hold(expires_at=NOW), FailedPrecondition, ErrorReason.HOLD_EXPIRED),
        (hold(expires_at=NOW - timedelta(seconds=1)), FailedPrecondition, ErrorReason.HOLD_EXPIRED),
    ],
)
def test_check_committable_explains_why_not(
    found: Hold | None, error: type[Exception], reason: ErrorReason
) -> None:
    with pytest.raises(error) as raised:
        check_committable(found, RSV, NOW)
    assert getattr(raised.value, "reason", None) is reason
    assert RSV in str(raised.value)


def test_require_reservation() -> None:
    open_hold = hold()
    assert require_reservation(open_hold, RSV) is open_hold
    for missing in (None, hold(status=HoldStatus.DENIED)):
        with pytest.raises(NotFound) as raised:
            require_reservation(missing, RSV)
        assert raised.value.reason is ErrorReason.RESERVATION_NOT_FOUND


@pytest.mark.parametrize(
    ("found", "outcome"),
    [
        (hold(), ReleaseAction.RELEASE),
        (hold(expires_at=NOW + timedelta(microseconds=1)), ReleaseAction.RELEASE),
        # Open past its expire time, not swept yet: the release expires it, as the sweep would.
        (hold(expires_at=NOW), ReleaseAction.EXPIRE),
        (hold(expires_at=NOW - timedelta(hours=1)), ReleaseAction.EXPIRE),
        (None, ErrorReason.RESERVATION_NOT_FOUND),
        (hold(status=HoldStatus.DENIED), ErrorReason.RESERVATION_NOT_FOUND),
        # A release never refunds: a hold committed first (even by a racing Commit) stays so.
        (hold(status=HoldStatus.COMMITTED), ErrorReason.HOLD_ALREADY_COMMITTED),
        (hold(status=HoldStatus.RELEASED), ErrorReason.HOLD_RELEASED),
        (hold(status=HoldStatus.EXPIRED), ErrorReason.HOLD_EXPIRED),
    ],
)
def test_decide_release(found: Hold | None, outcome: ReleaseAction | ErrorReason) -> None:
    if isinstance(outcome, ReleaseAction):
        assert decide_release(found, RSV, NOW) is outcome
        return
    with pytest.raises(BillingError) as raised:
        decide_release(found, RSV, NOW)
    assert raised.value.reason is outcome


@pytest.mark.parametrize(
    ("found", "refund_all", "reason"),
    [
        (hold(), False, ErrorReason.PARTIAL_RELEASE_NOT_ALLOWED),
        (hold(), True, ErrorReason.HOLD_NOT_COMMITTED),
        (hold(expires_at=NOW), True, ErrorReason.HOLD_EXPIRED),
        (hold(status=HoldStatus.RELEASED), True, ErrorReason.HOLD_RELEASED),
        (hold(status=HoldStatus.EXPIRED), False, ErrorReason.HOLD_EXPIRED),
        (None, True, ErrorReason.RESERVATION_NOT_FOUND),
        (hold(status=HoldStatus.DENIED), False, ErrorReason.RESERVATION_NOT_FOUND),
    ],
)
def test_check_refundable_refuses_all_but_a_committed_hold(
    found: Hold | None, refund_all: bool, reason: ErrorReason
) -> None:
    with pytest.raises(BillingError) as raised:
        check_refundable(found, RSV, NOW, refund_all=refund_all)
    assert raised.value.reason is reason
    committed = hold(status=HoldStatus.COMMITTED, expires_at=NOW - timedelta(hours=1))
    assert check_refundable(committed, RSV, NOW, refund_all=refund_all) is committed


@given(
    status=st.sampled_from(list(HoldStatus)),
    expires_in_s=st.integers(-3, 3),
    refund_all=st.booleans(),
)
def test_a_release_and_a_refund_never_act_on_each_others_holds(
    status: HoldStatus, expires_in_s: int, refund_all: bool
) -> None:
    """Whatever the hold's state and time: only an open hold is ever released (or expired) by
    a release, and only a committed one is ever refunded."""
    found = hold(status=status, expires_at=NOW + timedelta(seconds=expires_in_s))
    try:
        action = decide_release(found, RSV, NOW)
    except BillingError:
        assert status is not HoldStatus.OPEN
    else:
        assert status is HoldStatus.OPEN
        assert (action is ReleaseAction.RELEASE) == is_live(found, NOW) == (expires_in_s > 0)
    try:
        check_refundable(found, RSV, NOW, refund_all=refund_all)
    except BillingError:
        assert status is not HoldStatus.COMMITTED
    else:
        assert status is HoldStatus.COMMITTED


def test_refund_amount() -> None:
    committed = hold(status=HoldStatus.COMMITTED)
    assert refund_amount(committed, 8_730, 0, refund_all=True) == 8_730
    assert refund_amount(committed, 8_730, 1, refund_all=False) == 1
    assert refund_amount(committed, 8_730, 8_730, refund_all=False) == 8_730
    partly = hold(status=HoldStatus.COMMITTED, refunded=1_000)
    assert refund_amount(partly, 8_730, 0, refund_all=True) == 7_730
    assert refund_amount(partly, 8_730, 7_730, refund_all=False) == 7_730
    for found, charged, requested, everything in [
        (committed, 8_730, 8_731, False),
        (committed, 8_730, 0, False),  # an amount of 0 is not a refund
        (partly, 8_730, 7_731, False),
        (hold(status=HoldStatus.COMMITTED, refunded=8_730), 8_730, 0, True),
        (hold(status=HoldStatus.COMMITTED, refunded=8_730), 8_730, 1, False),
        (committed, 0, 0, True),  # an included model charged nothing
        (committed, 0, 1, False),
    ]:
        with pytest.raises(FailedPrecondition) as raised:
            refund_amount(found, charged, requested, refund_all=everything)
        assert raised.value.reason is ErrorReason.REFUND_EXCEEDS_CHARGE


@given(
    charged=st.integers(0, 10**13),
    refunded=st.integers(0, 10**13),
    asked=st.integers(0, 10**13),
    refund_all=st.booleans(),
)
def test_refunds_never_exceed_the_charge(
    charged: int, refunded: int, asked: int, refund_all: bool
) -> None:
    assume(refunded <= charged)
    found = hold(status=HoldStatus.COMMITTED, refunded=refunded)
    try:
        amount = refund_amount(found, charged, asked, refund_all)
    except FailedPrecondition:
        assert charged == refunded or (not refund_all and not 0 < asked <= charged - refunded)
    else:
        assert 0 < amount <= charged - refunded
        assert amount == (charged - refunded if refund_all else asked)


# Validation


BOUNDS = TtlBounds()
VALID_RESERVE = Reserve("req-1", "tenant-1", "user-1", "gpt-4o", amount_micros=1)
VALID_COMMIT = Commit("req-2", RSV, TokenUsage(1, 2, 3))
VALID_REFUND = Refund("req-3", RSV, 0, "")


def invalid_field(call: Any, *args: Any) -> str:
    with pytest.raises(InvalidArgument) as raised:
        call(*args)
    error = raised.value
    assert error.reason is ErrorReason.FIELD_INVALID
    assert error.message.startswith(f"{error.field}: ")
    return error.field


BAD_IDS = ["", "x" * 129, "has space", "tab\t", "caf\u00e9", "\u00e9" * 10]


def test_valid_commands_pass() -> None:
    assert validate_reserve(VALID_RESERVE, BOUNDS) == timedelta(minutes=5)
    assert validate_reserve(
        dataclasses.replace(
            VALID_RESERVE,
            amount_micros=None,
            estimate=QueryEstimate(0, 1),
            ttl=timedelta(hours=1),
        ),
        BOUNDS,
    ) == timedelta(hours=1)
    validate_reserve(dataclasses.replace(VALID_RESERVE, request_id="x" * 128), BOUNDS)
    validate_reserve(dataclasses.replace(VALID_RESERVE, request_id="!~"), BOUNDS)
    validate_reserve(dataclasses.replace(VALID_RESERVE, amount_micros=AMOUNT_MICROS_MAX), BOUNDS)
    validate_commit(VALID_COMMIT)
    validate_commit(Commit("r", RSV, TokenUsage(TOKENS_MAX, TOKENS_MAX, TOKENS_MAX)))
    validate_commit(Commit("r", RSV, TokenUsage(0, 0, 0)))
    validate_refund(VALID_REFUND)
    validate_refund(Refund("r", RSV, AMOUNT_MICROS_MAX, "x" * 500))
    validate_check_access(CheckAccess("t", "m"))
    validate_check_access(CheckAccess("t", "m", QueryEstimate(TOKENS_MAX, TOKENS_MAX)))
    validate_create_tenant(CreateTenant("r", "t", credit_limit_micros=0))
    validate_update_tenant(UpdateTenant("r", "t", credit_limit_micros=AMOUNT_MICROS_MAX))
    validate_grant(GrantCredit("r", "t", 1, "welcome"))


@pytest.mark.parametrize("field", ["request_id", "tenant_id", "user_id", "model"])
@pytest.mark.parametrize("bad", BAD_IDS)
def test_reserve_ids(field: str, bad: str) -> None:
    changes: dict[str, Any] = {field: bad}
    command = dataclasses.replace(VALID_RESERVE, **changes)
    assert invalid_field(validate_reserve, command, BOUNDS) == field


@pytest.mark.parametrize(
    ("estimate", "amount"),
    [(None, None), (QueryEstimate(1, 1), 1)],
)
def test_reserve_needs_exactly_one_of_estimate_and_amount(
    estimate: QueryEstimate | None, amount: int | None
) -> None:
    command = dataclasses.replace(VALID_RESERVE, estimate=estimate, amount_micros=amount)
    assert invalid_field(validate_reserve, command, BOUNDS) == "size"


@pytest.mark.parametrize("amount", [0, -1, AMOUNT_MICROS_MAX + 1])
def test_reserve_amount_bounds(amount: int) -> None:
    command = dataclasses.replace(VALID_RESERVE, amount_micros=amount)
    assert invalid_field(validate_reserve, command, BOUNDS) == "amount_micros"


@pytest.mark.parametrize(
    ("estimate", "field"),
    [
        (QueryEstimate(-1, 1), "estimate.input_tokens"),
        (QueryEstimate(TOKENS_MAX + 1, 1), "estimate.input_tokens"),
        (QueryEstimate(0, 0), "estimate.max_output_tokens"),
        (QueryEstimate(0, -1), "estimate.max_output_tokens"),
        (QueryEstimate(0, TOKENS_MAX + 1), "estimate.max_output_tokens"),
    ],
)
def test_estimate_bounds(estimate: QueryEstimate, field: str) -> None:
    command = dataclasses.replace(VALID_RESERVE, amount_micros=None, estimate=estimate)
    assert invalid_field(validate_reserve, command, BOUNDS) == field
    assert invalid_field(validate_check_access, CheckAccess("t", "m", estimate)) == field


@pytest.mark.parametrize(
    "ttl",
    [
        timedelta(0),
        timedelta(seconds=-1),
        timedelta(milliseconds=999),
        timedelta(hours=1, microseconds=1),
        timedelta(days=1),
    ],
)
def test_ttl_bounds(ttl: timedelta) -> None:
    command = dataclasses.replace(VALID_RESERVE, ttl=ttl)
    assert invalid_field(validate_reserve, command, BOUNDS) == "ttl"


def test_ttl_bounds_are_inclusive_and_configurable() -> None:
    for ttl in (timedelta(seconds=1), timedelta(hours=1)):
        assert validate_reserve(dataclasses.replace(VALID_RESERVE, ttl=ttl), BOUNDS) == ttl
    tight = TtlBounds(timedelta(seconds=30), timedelta(seconds=10), timedelta(seconds=60))
    assert validate_reserve(VALID_RESERVE, tight) == timedelta(seconds=30)
    too_long = dataclasses.replace(VALID_RESERVE, ttl=timedelta(seconds=61))
    assert invalid_field(validate_reserve, too_long, tight) == "ttl"


@pytest.mark.parametrize(
    "reservation_id",
    [
        "",
        "rsv_",
        "rsv_" + "0" * 31,
        "rsv_" + "0" * 33,
        "rsv_" + "0123456789ABCDEF" * 2,
        "RSV_" + "0" * 32,
        "res_" + "0" * 32,
        "rsv_" + "g" * 32,
        " rsv_" + "0" * 32,
        "rsv_" + "0" * 32 + "\n",
    ],
)
def test_malformed_reservation_ids(reservation_id: str) -> None:
    assert (
        invalid_field(
            validate_commit, dataclasses.replace(VALID_COMMIT, reservation_id=reservation_id)
        )
        == "reservation_id"
    )
    assert (
        invalid_field(
            validate_refund, dataclasses.replace(VALID_REFUND, reservation_id=reservation_id)
        )
        == "reservation_id"
    )


@pytest.mark.parametrize("bad", BAD_IDS)
def test_commit_and_refund_request_ids(bad: str) -> None:
    assert invalid_field(validate_commit, dataclasses.replace(VALID_COMMIT, request_id=bad)) == (
        "request_id"
    )
    assert invalid_field(validate_refund, dataclasses.replace(VALID_REFUND, request_id=bad)) == (
        "request_id"
    )


@pytest.mark.parametrize(
    ("usage", "field"),
    [
        (TokenUsage(-1, 0, 0), "usage.input_tokens"),
        (TokenUsage(TOKENS_MAX + 1, 0, 0), "usage.input_tokens"),
        (TokenUsage(0, -1, 0), "usage.cached_input_tokens"),
        (TokenUsage(0, TOKENS_MAX + 1, 0), "usage.cached_input_tokens"),
        (TokenUsage(0, 0, -1), "usage.output_tokens"),
        (TokenUsage(0, 0, TOKENS_MAX + 1), "usage.output_tokens"),
    ],
)
def test_usage_bounds(usage: TokenUsage, field: str) -> None:
    assert invalid_field(validate_commit, dataclasses.replace(VALID_COMMIT, usage=usage)) == field


@pytest.mark.parametrize(
    ("refund", "field"),
    [
        (Refund("r", RSV, -1), "amount_micros"),
        (Refund("r", RSV, AMOUNT_MICROS_MAX + 1), "amount_micros"),
        (Refund("r", RSV, 0, "x" * 501), "reason"),
        # A refund says one thing: an amount, or all of it.
        (Refund("r", RSV, 1, refund_all=True), "amount_micros"),
    ],
)
def test_refund_fields(refund: Refund, field: str) -> None:
    assert invalid_field(validate_refund, refund) == field


@pytest.mark.parametrize(
    ("release", "field"),
    [
        (Release("", RSV), "request_id"),
        (Release("r" * 129, RSV), "request_id"),
        (Release("r", "rsv_x"), "reservation_id"),
        (Release("r", RSV, "x" * 501), "reason"),
    ],
)
def test_release_fields(release: Release, field: str) -> None:
    validate_release(Release("r", RSV, "x" * 500))
    assert invalid_field(validate_release, release) == field


def test_which_refund_is_a_release() -> None:
    """Only the shape earlier clients sent to release (no amount, not refund_all) releases;
    its fingerprint, like every request's made before refund_all existed, is unchanged."""
    assert Refund("r", RSV).asks_release
    assert not Refund("r", RSV, 1).asks_release
    assert not Refund("r", RSV, refund_all=True).asks_release
    assert fingerprint(Refund("r", RSV, 0, "x")) == (
        "d0a6912ac36802d372abd913f19754b67a1c875839bc70ba4925eef1a08ce5ee"
    )
    assert fingerprint(Refund("r", RSV, refund_all=True)) != fingerprint(Refund("r", RSV))


@pytest.mark.parametrize(
    ("grant", "field"),
    [
        (GrantCredit("", "t", 1, "why"), "request_id"),
        (GrantCredit("r", "x" * 129, 1, "why"), "tenant_id"),
        (GrantCredit("r", "t", 0, "why"), "amount_micros"),
        (GrantCredit("r", "t", -5, "why"), "amount_micros"),
        (GrantCredit("r", "t", AMOUNT_MICROS_MAX + 1, "why"), "amount_micros"),
        (GrantCredit("r", "t", 1, ""), "reason"),
        (GrantCredit("r", "t", 1, "   "), "reason"),
        (GrantCredit("r", "t", 1, "x" * 501), "reason"),
    ],
)
def test_grant_fields(grant: GrantCredit, field: str) -> None:
    assert invalid_field(validate_grant, grant) == field


@pytest.mark.parametrize(
    ("command", "validate", "field"),
    [
        (CreateTenant("", "t"), validate_create_tenant, "request_id"),
        (CreateTenant("r", ""), validate_create_tenant, "tenant_id"),
        (
            CreateTenant("r", "t", credit_limit_micros=-1),
            validate_create_tenant,
            "credit_limit_micros",
        ),
        (
            CreateTenant("r", "t", credit_limit_micros=AMOUNT_MICROS_MAX + 1),
            validate_create_tenant,
            "credit_limit_micros",
        ),
        (UpdateTenant("r" * 129, "t"), validate_update_tenant, "request_id"),
        (UpdateTenant("r", "a b"), validate_update_tenant, "tenant_id"),
        (
            UpdateTenant("r", "t", credit_limit_micros=-1),
            validate_update_tenant,
            "credit_limit_micros",
        ),
        (CheckAccess("", "m"), validate_check_access, "tenant_id"),
        (CheckAccess("t", ""), validate_check_access, "model"),
    ],
)
def test_admin_and_check_access_fields(command: Any, validate: Any, field: str) -> None:
    assert invalid_field(validate, command) == field


# Fingerprints


@pytest.mark.parametrize(
    ("command", "digest"),
    [
        (
            Reserve("req-1", "tenant-1", "user-1", "gpt-4o", amount_micros=1),
            "5b5ea7b7991c2c8f1110b6677c1ca65e9166b3ae41d9ceeed9d6ed23682184c9",
        ),
        (
            Reserve(
                "req-1",
                "tenant-1",
                "user-1",
                "gpt-4o",
                estimate=QueryEstimate(1000, 500),
                ttl=timedelta(seconds=90),
            ),
            "d6a0942d44be3f290be56f97ef14cd6d9959173a097e3fabc2783d0e4873a48d",
        ),
        (
            Commit("req-2", RSV, TokenUsage(1, 2, 3)),
            "16599f2e119c321869a5a25a76f2d514025aed405d0aa25840f5864c46beacac",
        ),
    ],
)
def test_fingerprints_are_pinned_across_releases(command: Any, digest: str) -> None:
    # Fingerprints are stored: a change of the canonical form would turn every retry of a request
    # made before an upgrade into REQUEST_ID_REUSED.
    assert fingerprint(command) == digest


def test_equal_commands_have_equal_fingerprints() -> None:
    assert fingerprint(VALID_RESERVE) == fingerprint(dataclasses.replace(VALID_RESERVE))
    assert fingerprint(Commit("a", RSV, TokenUsage(1, 2, 3))) == fingerprint(
        Commit("a", RSV, TokenUsage(1, 2, 3))
    )
    assert fingerprint(Reserve("a", "t", "u", "m", ttl=timedelta(seconds=60))) == fingerprint(
        Reserve("a", "t", "u", "m", ttl=timedelta(minutes=1))
    )


def test_every_field_is_part_of_the_fingerprint() -> None:
    variants: list[Any] = [
        VALID_RESERVE,
        dataclasses.replace(VALID_RESERVE, request_id="req-2"),
        dataclasses.replace(VALID_RESERVE, tenant_id="tenant-2"),
        dataclasses.replace(VALID_RESERVE, user_id="user-2"),
        dataclasses.replace(VALID_RESERVE, model="gpt-4.1"),
        dataclasses.replace(VALID_RESERVE, amount_micros=2),
        dataclasses.replace(VALID_RESERVE, amount_micros=None, estimate=QueryEstimate(0, 1)),
        dataclasses.replace(VALID_RESERVE, amount_micros=None, estimate=QueryEstimate(1, 0)),
        dataclasses.replace(VALID_RESERVE, ttl=timedelta(seconds=30)),
        VALID_COMMIT,
        dataclasses.replace(VALID_COMMIT, usage=TokenUsage(1, 3, 2)),
        dataclasses.replace(VALID_COMMIT, usage=TokenUsage(2, 1, 3)),
        dataclasses.replace(VALID_COMMIT, reservation_id="rsv_" + "1" * 32),
        VALID_REFUND,
        dataclasses.replace(VALID_REFUND, amount_micros=1),
        dataclasses.replace(VALID_REFUND, reason="ticket 1"),
        GrantCredit("g", "t", 1, "a"),
        GrantCredit("g", "t", 1, "b"),
        GrantCredit("g", "t", 2, "a"),
        CreateTenant("c", "t"),
        CreateTenant("c", "t", credit_limit_micros=0),
        CreateTenant("c", "t", payment_method_on_file=True),
        CreateTenant("c", "t", status=TenantStatus.SUSPENDED),
        UpdateTenant("c", "t"),
        UpdateTenant("c", "t", payment_method_on_file=False),
        UpdateTenant("c", "t", status=TenantStatus.ACTIVE),
        UpdateTenant("c", "t", credit_limit_micros=0),
    ]
    digests = [fingerprint(command) for command in variants]
    assert len(set(digests)) == len(digests)


def test_the_command_type_is_part_of_the_fingerprint() -> None:
    # Same field values, different calls.
    assert fingerprint(CreateTenant("r", "t")) != fingerprint(UpdateTenant("r", "t"))


@given(
    st.text(min_size=1, max_size=20),
    st.text(min_size=1, max_size=20),
    st.integers(0, AMOUNT_MICROS_MAX),
    st.text(max_size=20),
)
def test_fingerprints_are_deterministic_and_field_sensitive(
    request_id: str, reservation_id: str, amount: int, reason: str
) -> None:
    refund = Refund(request_id, reservation_id, amount, reason)
    assert fingerprint(refund) == fingerprint(Refund(request_id, reservation_id, amount, reason))
    assert fingerprint(refund) != fingerprint(dataclasses.replace(refund, amount_micros=amount + 1))
    assert fingerprint(refund) != fingerprint(dataclasses.replace(refund, reason=reason + "x"))


# format_micros


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (0, "$0.00"),
        (1, "$0.000001"),
        (125, "$0.000125"),
        (10_000, "$0.01"),
        (100_000, "$0.10"),
        (500_000, "$0.50"),
        (1_234_567, "$1.234567"),
        (1_500_000, "$1.50"),
        (25_000_000, "$25.00"),
        (24_994_130, "$24.99413"),
        (1_000_000_000_000, "$1,000,000.00"),
        (-1, "-$0.000001"),
        (-25_000_000, "-$25.00"),
        (-1_234_567_890, "-$1,234.56789"),
    ],
)
def test_format_micros(micros: int, text: str) -> None:
    assert format_micros(micros) == text


@given(st.integers(-(10**15), 10**15))
def test_format_micros_is_exact(micros: int) -> None:
    text = format_micros(micros)
    match = re.fullmatch(r"(-?)\$(\d{1,3}(?:,\d{3})*)\.(\d{2,6})", text)
    assert match is not None, text
    sign, units, fraction = match.groups()
    assert len(fraction) == 2 or not fraction.endswith("0")
    value = int(units.replace(",", "")) * 1_000_000 + int(fraction.ljust(6, "0"))
    assert (-value if sign else value) == micros
    assert (sign == "-") == (micros < 0)
