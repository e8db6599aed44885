"""A credit denial never contradicts itself: the availability it reports, in its message and in
`available_micros`, is the one it was decided on, below what the query needs, on every path
(SQLite, the general transaction, PostgreSQL's one-statement reservation)."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from billing_service.core import BillingCore
from billing_service.domain.commands import CreateTenant, GrantCredit, Refund, Reserve
from billing_service.domain.model import Account, DenialReason, Hold, TenantStatus
from billing_service.domain.money import format_micros
from billing_service.domain.policy import Decision
from billing_service.storage import reservations
from billing_service.storage.ledger_store import LedgerStore
from tests.ledger.conftest import FLAT
from tests.support.clock import FakeClock

FLAT_PRICE = 250_000
CREDIT_DENIALS = {DenialReason.CREDIT_LIMIT_REACHED, DenialReason.PAYMENT_METHOD_REQUIRED}


def rid() -> str:
    return str(uuid.uuid4())


def assert_consistent(decision: Decision) -> None:
    """A denial for lack of credit reports an availability below what is needed, and says the
    same numbers in words."""
    if decision.allowed or decision.reason not in CREDIT_DENIALS:
        return
    assert decision.available_micros < decision.required_micros, decision
    if decision.reason is DenialReason.CREDIT_LIMIT_REACHED:
        assert format_micros(decision.required_micros) in decision.message, decision
        assert format_micros(max(0, decision.available_micros)) in decision.message, decision


async def tenant_with_one_call_of_room(core: BillingCore, tenant_id: str) -> None:
    """A tenant whose credit fits exactly one FLAT call."""
    await core.create_tenant(
        CreateTenant(rid(), tenant_id, FLAT_PRICE, TenantStatus.ACTIVE, payment_method_on_file=True)
    )


def reserve(tenant_id: str) -> Reserve:
    return Reserve(rid(), tenant_id, "user", FLAT, amount_micros=FLAT_PRICE)


async def test_a_denial_reports_the_availability_it_was_decided_on_when_credit_frees_meanwhile(
    core: BillingCore,
    store: LedgerStore,
    clock: FakeClock,
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The refused hold and the read that explains it are two statements; another call frees
    credit between them (injected here, where the general transaction reads the account after
    its conditional UPDATE found no room)."""
    if backend == "sqlite":
        pytest.skip("SQLite serializes transactions: nothing commits between the two")
    await tenant_with_one_call_of_room(core, "acme")
    first = await core.reserve(reserve("acme"))
    assert first.hold is not None
    hold_id = first.hold.hold_id
    take_hold = reservations.take_hold_for
    freed: list[bool] = []

    async def take_then_free(conn: AsyncConnection, hold: Hold) -> tuple[Account, bool] | None:
        taken = await take_hold(conn, hold)
        if taken is None and not freed:
            freed.append(True)
            # Another call (its own connection) releases the open hold and commits.
            await store.refund(Refund(rid(), hold_id), "release", clock())
        return taken

    monkeypatch.setattr(reservations, "take_hold_for", take_then_free)
    second = await core.reserve(reserve("acme"))
    assert freed, "the injection point was not reached"
    assert_consistent(second.decision)


async def test_denials_under_concurrent_holds_and_releases_never_contradict_themselves(
    core: BillingCore,
) -> None:
    """Many reservations race releases of the holds that fill the credit; every denial must
    still report less room than it needed."""
    rng = random.Random(1303)
    tenants = [f"tenant-{number}" for number in range(3)]
    for tenant_id in tenants:
        await tenant_with_one_call_of_room(core, tenant_id)
        await core.grant_credit(GrantCredit(rid(), tenant_id, FLAT_PRICE, "room for two"))
    decisions: list[Decision] = []

    async def one_call(tenant_id: str) -> None:
        result = await core.reserve(reserve(tenant_id))
        decisions.append(result.decision)
        if result.hold is not None:
            await asyncio.sleep(0)
            await core.refund(Refund(rid(), result.hold.hold_id))

    chosen = [rng.choice(tenants) for _ in range(150)]
    for start in range(0, len(chosen), 30):
        await asyncio.gather(*(one_call(tenant) for tenant in chosen[start : start + 30]))
    assert any(not decision.allowed for decision in decisions), "no denial was exercised"
    for decision in decisions:
        assert_consistent(decision)
