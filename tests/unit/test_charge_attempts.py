"""The charge lifecycle's rules in plain Python: what the worker does next with a charge, how
long it waits, and which moves between statuses exist."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from billing_service.domain.charge_attempts import (
    RESEND_WINDOW,
    RETRY_DELAY_MAX,
    RETRY_DELAY_MIN,
    ChargeStep,
    next_step,
    retry_delay,
)
from billing_service.domain.payments import (
    ALLOWED_BEFORE,
    MAY_TAKE_MONEY,
    OPEN_STATUSES,
    TOOK_MONEY,
    Charge,
    ChargeStatus,
    ChargeTrigger,
)

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
CHARGE = Charge(
    charge_id="chg_" + "0" * 32,
    tenant_id="acme",
    amount_micros=5_000_000,
    trigger=ChargeTrigger.AUTOMATIC,
    status=ChargeStatus.PENDING,
    payment_intent_id=None,
    failure_message=None,
    refunded_micros=0,
    created_at=NOW - timedelta(days=2),
    updated_at=NOW - timedelta(days=2),
    stripe_customer_id="cus_1",
    payment_method_id="pm_1",
    currency="usd",
)

cards = st.sampled_from([None, "pm_1", "pm_2"])
ages = st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=3))


@given(card=cards, active=st.booleans(), sent_ago=st.none() | ages)
def test_a_charge_that_may_have_reached_stripe_is_never_abandoned(
    card: str | None, active: bool, sent_ago: timedelta | None
) -> None:
    charge = replace(CHARGE, sent_at=None if sent_ago is None else NOW - sent_ago)
    step = next_step(charge, NOW, card_on_file=card, tenant_active=active)
    if sent_ago is None:
        made = card == "pm_1" and active
        assert step is (ChargeStep.SEND if made else ChargeStep.ABANDON)
    else:
        # What the tenant's card or status is now does not matter any more.
        assert step is (ChargeStep.FIND if sent_ago >= RESEND_WINDOW else ChargeStep.SEND)


@given(card=cards, active=st.booleans(), sent_ago=st.none() | ages)
def test_a_known_payment_intent_is_read_not_sent(
    card: str | None, active: bool, sent_ago: timedelta | None
) -> None:
    charge = replace(
        CHARGE, payment_intent_id="pi_1", sent_at=None if sent_ago is None else NOW - sent_ago
    )
    assert next_step(charge, NOW, card_on_file=card, tenant_active=active) is ChargeStep.READ


def test_a_sent_charge_without_its_parameters_is_looked_up_not_resent() -> None:
    legacy = replace(CHARGE, payment_method_id=None, sent_at=NOW - timedelta(minutes=1))
    assert next_step(legacy, NOW, card_on_file="pm_1", tenant_active=True) is ChargeStep.FIND


@given(attempts=st.integers(min_value=0, max_value=10_000))
def test_retry_delays_grow_and_stay_bounded(attempts: int) -> None:
    delay = retry_delay(attempts)
    assert RETRY_DELAY_MIN <= delay <= RETRY_DELAY_MAX
    assert delay <= retry_delay(attempts + 1)


def test_the_statuses_that_count_against_the_ceiling() -> None:
    assert OPEN_STATUSES <= MAY_TAKE_MONEY
    assert TOOK_MONEY <= MAY_TAKE_MONEY
    assert ChargeStatus.ACTION_REQUIRED in MAY_TAKE_MONEY
    assert ChargeStatus.FAILED not in MAY_TAKE_MONEY


def test_only_stripes_answer_moves_a_charge_out_of_pending_or_unresolved() -> None:
    # Nothing returns to PENDING; a charge that took money never leaves TOOK_MONEY.
    assert ChargeStatus.PENDING not in ALLOWED_BEFORE
    for status, before in ALLOWED_BEFORE.items():
        if status not in TOOK_MONEY:
            assert not before & TOOK_MONEY, status
    assert ALLOWED_BEFORE[ChargeStatus.UNRESOLVED] == {ChargeStatus.PENDING}
    assert ChargeStatus.UNRESOLVED in ALLOWED_BEFORE[ChargeStatus.SUCCEEDED]
    assert ChargeStatus.UNRESOLVED in ALLOWED_BEFORE[ChargeStatus.FAILED]
