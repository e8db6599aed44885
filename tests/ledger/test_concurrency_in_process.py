"""Hundreds of concurrent calls for one tenant, in one process, on SQLite and on PostgreSQL.

The exposure cap must hold to the micro whatever the interleaving: exactly as many holds are
granted as fit, a commit above its hold never takes the tenant past its limit, and a retry that
races its original returns the same answer.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TypeVar, cast

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_service.core import BillingCore, CoreSettings, ReserveResult
from billing_service.domain.commands import (
    Commit,
    CreateTenant,
    GrantCredit,
    Refund,
    Reserve,
    UpdateTenant,
)
from billing_service.domain.errors import AlreadyExists, ErrorReason, FailedPrecondition
from billing_service.domain.ledger import EntryKind
from billing_service.domain.model import DenialReason, Hold, HoldStatus
from billing_service.domain.outcomes import CommitOutcome, GrantOutcome, RefundOutcome
from billing_service.domain.pricing import TokenUsage
from billing_service.storage.database import create_engine
from billing_service.storage.ledger_store import LedgerStore
from tests.ledger.books import assert_books_balance, money, snapshot
from tests.ledger.conftest import PRICES, TOKENS
from tests.support.clock import FakeClock

T = TypeVar("T")

LIMIT = 25_000_000
# 3 micros per input token of TOKENS: an amount of 23,334 input tokens.
AMOUNT = 70_002
assert LIMIT % AMOUNT != 0
FITS = LIMIT // AMOUNT  # 357
LEFT = LIMIT - FITS * AMOUNT  # 9,286 left once the cap is reached
CALLS = 500
EXTRA = 150  # what a commit above its hold costs beyond it (50 input tokens)


@dataclass
class Setup:
    core: BillingCore
    engine: AsyncEngine
    clock: FakeClock


@pytest.fixture
async def setup(database_url: str, clock: FakeClock) -> AsyncIterator[Setup]:
    # Enough connections that the calls really overlap on PostgreSQL (SQLite has one).
    engine = create_engine(database_url, pool_size=50)
    core = BillingCore(LedgerStore(engine), PRICES, CoreSettings(), clock)
    yield Setup(core, engine, clock)
    await engine.dispose()


async def gather(calls: list[Awaitable[T]]) -> list[T]:
    return list(await asyncio.gather(*calls))


async def gather_shuffled(calls: list[Awaitable[T]], seed: int = 20261124) -> list[T]:
    """Starts the calls in a random (seeded) order; returns their answers in the given order."""
    order = list(range(len(calls)))
    random.Random(seed).shuffle(order)
    started: dict[int, asyncio.Future[T]] = {}
    for index in order:
        started[index] = asyncio.ensure_future(calls[index])
    return list(await asyncio.gather(*(started[index] for index in range(len(calls)))))


def as_first_answer(answer: object) -> object:
    """A retried reservation shows its hold as it is now; its first answer showed it open."""
    if isinstance(answer, ReserveResult) and answer.hold is not None:
        hold = replace(answer.hold, status=HoldStatus.OPEN, settled_at=None, refunded_micros=0)
        return replace(answer, hold=hold)
    return answer


def of_type(values: Sequence[object], kind: type[T]) -> list[T]:
    assert all(isinstance(value, kind) for value in values), values
    return cast(list[T], values)


def input_tokens(cost: int) -> TokenUsage:
    assert cost % 3 == 0
    return TokenUsage(cost // 3, 0, 0)


async def test_the_exposure_cap_holds_under_concurrent_calls(setup: Setup) -> None:
    core, engine, clock = setup.core, setup.engine, setup.clock
    await core.create_tenant(
        CreateTenant("create", "acme", credit_limit_micros=LIMIT, payment_method_on_file=True)
    )

    # 1. 500 concurrent reservations: exactly as many as fit are granted.
    reserves = [
        Reserve(f"r{i}", "acme", f"user{i % 7}", TOKENS, amount_micros=AMOUNT) for i in range(CALLS)
    ]
    results = await gather([core.reserve(command) for command in reserves])
    holds: list[Hold] = [result.hold for result in results if result.hold is not None]
    denied = [result.decision for result in results if not result.decision.allowed]
    assert len(holds) == FITS
    assert len(denied) == CALLS - FITS
    assert {decision.reason for decision in denied} == {DenialReason.CREDIT_LIMIT_REACHED}
    assert all(0 <= decision.available_micros < AMOUNT for decision in denied)
    # Each grant saw the one before it: available after the k-th grant is LIMIT - k x AMOUNT.
    assert sorted(result.decision.available_micros for result in results if result.hold) == [
        LIMIT - k * AMOUNT for k in range(FITS, 0, -1)
    ]
    assert await money(engine, "acme") == (0, FITS * AMOUNT)
    await assert_books_balance(engine)

    # 2. A quarter of the reservations again, concurrently: each retry returns its first answer.
    before = await snapshot(engine)
    assert await gather([core.reserve(command) for command in reserves[::4]]) == results[::4]
    assert await snapshot(engine) == before

    # 3. 100 commits above their holds, each sent twice at once. Each takes EXTRA while credit
    # remains, then what is left, then nothing: whatever the order, 61 x 150 + 136 = LEFT.
    above = holds[:100]
    commits = [
        Commit(f"c{hold.hold_id}", hold.hold_id, input_tokens(AMOUNT + EXTRA)) for hold in above
    ]
    outcomes = await gather_shuffled([core.commit(command) for command in commits + commits])
    assert outcomes[:100] == outcomes[100:]
    records = [outcome.record for outcome in outcomes[:100]]
    extras = Counter(record.charged_micros - AMOUNT for record in records)
    assert extras == Counter({EXTRA: LEFT // EXTRA, LEFT % EXTRA: 1, 0: 100 - LEFT // EXTRA - 1})
    assert sum(record.uncollected_micros for record in records) == 100 * EXTRA - LEFT
    charged = sum(record.charged_micros for record in records)
    assert charged == 100 * AMOUNT + LEFT
    assert await money(engine, "acme") == (-charged, (FITS - 100) * AMOUNT)
    assert (await core.get_tenant("acme")).available_micros == 0
    await assert_books_balance(engine)

    # 4. At once, in random order: commits within their holds, releases, new reservations,
    # grants, and a retry of each. Who wins a race varies; the books and the cap may not.
    within, released, left_open = holds[100:200], holds[200:300], holds[300:]
    commits_within = [
        Commit(f"c{hold.hold_id}", hold.hold_id, input_tokens(60_000)) for hold in within
    ]
    releases = [Refund(f"f{hold.hold_id}", hold.hold_id, 0, "cancelled") for hold in released]
    more = [Reserve(f"more{i}", "acme", "late", TOKENS, amount_micros=AMOUNT) for i in range(100)]
    grants = [GrantCredit(f"g{i}", "acme", 1_000, "goodwill") for i in range(10)]
    calls: list[Awaitable[object]] = []
    for _ in range(2):
        calls += [core.commit(command) for command in commits_within]
        calls += [core.refund(command) for command in releases]
        calls += [core.reserve(command) for command in more]
        calls += [core.grant_credit(command) for command in grants]
    mixed = await gather_shuffled(calls)
    half = len(mixed) // 2
    assert mixed[:half] == mixed[half:]
    within_outcomes = of_type(mixed[:100], CommitOutcome)
    release_outcomes = of_type(mixed[100:200], RefundOutcome)
    late_results = of_type(mixed[200:300], ReserveResult)
    grant_outcomes = of_type(mixed[300:310], GrantOutcome)
    assert {outcome.record.charged_micros for outcome in within_outcomes} == {60_000}
    assert {(outcome.kind, outcome.amount_micros) for outcome in release_outcomes} == {
        (EntryKind.RELEASE, AMOUNT)
    }
    late = [result.hold for result in late_results if result.hold]
    charged += 100 * 60_000
    balance = -charged + 10 * 1_000
    held = (len(left_open) + len(late)) * AMOUNT
    assert await money(engine, "acme") == (balance, held)
    assert balance + LIMIT - held >= 0
    await assert_books_balance(engine)

    # 5. A third of the requests of every kind once more, concurrently: nothing changes.
    before = await snapshot(engine)
    replay: list[Awaitable[object]] = [core.reserve(c) for c in (reserves + more)[::3]]
    replay += [core.commit(command) for command in (commits + commits_within)[::3]]
    replay += [core.refund(command) for command in releases[::3]]
    replay += [core.grant_credit(command) for command in grants[::3]]
    first_answers: list[object] = [
        *[*results, *late_results][::3],
        *[*outcomes[:100], *within_outcomes][::3],
        *release_outcomes[::3],
        *grant_outcomes[::3],
    ]
    assert [as_first_answer(answer) for answer in await gather_shuffled(replay)] == first_answers
    assert await snapshot(engine) == before

    # 6. The open holds expire; two sweepers race to release them, each exactly once.
    clock.advance(minutes=5)
    swept = await gather([core.release_expired(limit=1_000) for _ in range(2)])
    assert sum(swept) == len(left_open) + len(late)
    assert await money(engine, "acme") == (balance, 0)
    assert (await core.get_tenant("acme")).available_micros == balance + LIMIT
    await assert_books_balance(engine)


async def test_concurrent_first_calls_create_one_tenant(setup: Setup) -> None:
    core, engine = setup.core, setup.engine
    results = await gather(
        [core.reserve(Reserve(f"r{i}", "newco", "u", TOKENS, amount_micros=1)) for i in range(50)]
    )
    assert {result.decision.reason for result in results} == {DenialReason.PAYMENT_METHOD_REQUIRED}
    tenant = await core.get_tenant("newco")
    assert (tenant.credit_limit_micros, tenant.payment_method_on_file) == (LIMIT, False)
    assert (await snapshot(engine)).counts[:2] == (1, 50)
    await assert_books_balance(engine)


async def test_concurrent_commits_of_one_hold_settle_it_once(setup: Setup) -> None:
    core, engine = setup.core, setup.engine
    await core.create_tenant(CreateTenant("create", "acme", payment_method_on_file=True))
    result = await core.reserve(Reserve("r1", "acme", "u", TOKENS, amount_micros=AMOUNT))
    assert result.hold is not None
    hold_id = result.hold.hold_id
    # Ten different commits and ten releases of the same hold race: exactly one of them wins.
    calls: list[Awaitable[object]] = [
        core.commit(Commit(f"c{i}", hold_id, input_tokens(3 * (i + 1)))) for i in range(10)
    ]
    calls += [core.refund(Refund(f"f{i}", hold_id)) for i in range(10)]
    answers = await asyncio.gather(*calls, return_exceptions=True)
    commit_answers, refund_answers = answers[:10], answers[10:]
    committed = [answer for answer in commit_answers if isinstance(answer, CommitOutcome)]
    released = [
        answer
        for answer in refund_answers
        if isinstance(answer, RefundOutcome) and answer.kind is EntryKind.RELEASE
    ]
    refunded = [
        answer
        for answer in refund_answers
        if isinstance(answer, RefundOutcome) and answer.kind is EntryKind.REFUND
    ]
    # Either one commit won and every release finds the hold committed (a release never
    # refunds), or one release won and every commit finds the hold released.
    assert len(committed) + len(released) == 1, answers
    assert refunded == []
    errors = [answer for answer in answers if isinstance(answer, BaseException)]
    assert len(errors) == len(answers) - 1
    assert all(isinstance(error, FailedPrecondition) for error in errors), errors
    reasons = {error.reason for error in errors if isinstance(error, FailedPrecondition)}
    balance, held = await money(engine, "acme")
    assert held == 0
    if committed:
        assert reasons == {ErrorReason.HOLD_ALREADY_COMMITTED}
        assert balance == -committed[0].record.charged_micros
    else:
        assert reasons == {ErrorReason.HOLD_RELEASED}
        assert (released[0].amount_micros, balance) == (AMOUNT, 0)
    await assert_books_balance(engine)


async def test_a_reservation_racing_its_own_retry_takes_one_hold(setup: Setup) -> None:
    core, engine = setup.core, setup.engine
    await core.create_tenant(CreateTenant("create", "acme", payment_method_on_file=True))
    command = Reserve("r1", "acme", "u", TOKENS, amount_micros=AMOUNT, ttl=timedelta(seconds=60))
    results = await gather([core.reserve(command) for _ in range(20)])
    assert all(result == results[0] for result in results)
    assert await money(engine, "acme") == (0, AMOUNT)
    assert (await snapshot(engine)).counts[1] == 1
    await assert_books_balance(engine)


async def test_concurrent_copies_of_each_call_apply_once(setup: Setup) -> None:
    """Twenty copies of one request racing (a client retrying on several replicas)."""
    core, engine = setup.core, setup.engine

    async def copies(call: Callable[[], Awaitable[T]]) -> T:
        answers = await gather([call() for _ in range(20)])
        assert all(answer == answers[0] for answer in answers), answers
        return answers[0]

    create = CreateTenant("create", "acme", credit_limit_micros=LIMIT)
    await copies(lambda: core.create_tenant(create))
    update = UpdateTenant("update", "acme", payment_method_on_file=True)
    await copies(lambda: core.update_tenant(update))
    grant = GrantCredit("grant", "acme", 1_000_000, "prepaid")
    granted_outcome = await copies(lambda: core.grant_credit(grant))
    assert granted_outcome.balance.balance_micros == 1_000_000
    holds = []
    for number in range(2):
        result = await core.reserve(
            Reserve(f"r{number}", "acme", "u", TOKENS, amount_micros=AMOUNT)
        )
        assert result.hold is not None
        holds.append(result.hold)
    commit = Commit("commit", holds[0].hold_id, input_tokens(60_000))
    await copies(lambda: core.commit(commit))
    part = Refund("part", holds[0].hold_id, 10_000)
    assert (await copies(lambda: core.refund(part))).refunded_total_micros == 10_000
    release = Refund("release", holds[1].hold_id)
    assert (await copies(lambda: core.refund(release))).kind is EntryKind.RELEASE
    # Different content under one request_id, at once: one wins, the others are refused.
    answers = await asyncio.gather(
        *(core.grant_credit(GrantCredit("g", "acme", 1 + i, "x")) for i in range(10)),
        return_exceptions=True,
    )
    won = [answer for answer in answers if isinstance(answer, GrantOutcome)]
    refused = [answer for answer in answers if isinstance(answer, AlreadyExists)]
    assert (len(won), len(refused)) == (1, 9), answers
    assert {error.reason for error in refused} == {ErrorReason.REQUEST_ID_REUSED}
    extra = won[0].balance.balance_micros - (1_000_000 - 60_000 + 10_000)
    assert 1 <= extra <= 10
    assert await money(engine, "acme") == (1_000_000 - 60_000 + 10_000 + extra, 0)
    counts = (await snapshot(engine)).counts
    # tenants, holds, entries (grant, 2 holds, debit, refund, release, grant), usage, admin
    assert counts == (1, 2, 7, 1, 2)
    await assert_books_balance(engine)
