"""Random sequences of every billing call against an exact model of the money, on both databases.

The model knows each tenant's balance, held amount and settings and each hold's state; every
rule predicts the exact answer (or error) of the core and applies it to the model. After every
step the books must balance (audit_ledger and tests/ledger/books.py), the stored balance and held
amounts must equal the model's, and every hold must be in the state the model says.

A limit lowered below a tenant's exposure (a smaller limit, or its card removed) is allowed and
honours open holds; such a tenant's available credit may then be negative, and the audit must
report exactly that and nothing else.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, ClassVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_service.budget_core import BudgetCore
from billing_service.core import BillingCore, CoreSettings, ExtendResult, ReserveResult
from billing_service.domain.budgets import (
    DENIAL_REASONS,
    Budget,
    BudgetPeriod,
    BudgetScope,
    BudgetUsage,
    DeleteBudget,
    SetBudget,
    in_scope_order,
    period_start,
)
from billing_service.domain.commands import (
    CheckAccess,
    Commit,
    CreateTenant,
    ExtendHold,
    GrantCredit,
    QueryEstimate,
    Refund,
    Release,
    Reserve,
    UpdateTenant,
    fingerprint,
)
from billing_service.domain.errors import BillingError, ErrorReason
from billing_service.domain.ledger import EntryKind, settle
from billing_service.domain.model import (
    Account,
    Balance,
    DenialReason,
    Hold,
    HoldStatus,
    PaymentSource,
    TenantStatus,
)
from billing_service.domain.outcomes import (
    CommitOutcome,
    GrantOutcome,
    RefundOutcome,
    ReleaseOutcome,
)
from billing_service.domain.page_tokens import PageTokens
from billing_service.domain.policy import Decision, budget_denial, decide, denial, within_budgets
from billing_service.domain.pricing import ModelBilling, ModelPrice, TokenUsage
from billing_service.storage.audit import audit_ledger
from billing_service.storage.budget_store import BudgetStore
from billing_service.storage.database import create_engine
from billing_service.storage.ledger_store import LedgerStore
from billing_service.storage.tables import (
    admin_requests,
    budget_periods,
    budget_requests,
    budgets,
    hold_extensions,
    holds,
    ledger_entries,
    tenants,
    usage_records,
    usage_rollups,
)
from tests.ledger.books import Tables, read_tables, snapshot, table_problems
from tests.ledger.conftest import FLAT, INCLUDED, PRICES, START, TOKENS
from tests.support.clock import FakeClock
from tests.usage.books import rollup_problems

# What the runs did, to see that they reach the interesting states (printed; shown with -s).
OUTCOMES: Counter[str] = Counter()


def event(outcome: str) -> None:
    OUTCOMES[outcome] += 1


DEFAULT_LIMIT = 1_000_000
TENANTS = ["t0", "t1", "t2"]  # t2 is created by its first reservation
MODELS = [TOKENS, FLAT, INCLUDED]
SETTINGS = settings(
    max_examples=30,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

amounts = st.one_of(
    st.sampled_from([1, 249_999, 250_000, 999_999, 1_000_000]), st.integers(1, 1_500_000)
)
estimates = st.builds(QueryEstimate, st.integers(0, 100_000), st.integers(1, 60_000))
ttls = st.sampled_from([None, timedelta(seconds=1), timedelta(seconds=30), timedelta(minutes=10)])
limits = st.sampled_from([0, 300_000, DEFAULT_LIMIT, 2_000_000, 5_000_000])
tenant_ids = st.sampled_from(TENANTS)
CAP = -1  # a commit costing more than the hold and all the credit left
# Who a call is for: (user_id, api_key_id); budgets are set on "u1" and "k1".
callers = st.sampled_from([("user", ""), ("u1", ""), ("user", "k1"), ("u1", "k1")])
budget_scopes = st.sampled_from([(BudgetScope.USER, "u1"), (BudgetScope.API_KEY, "k1")])
BudgetKey = tuple[str, BudgetScope, str]
PeriodKey = tuple[str, str, str, datetime]


@dataclass
class TenantModel:
    credit_limit: int
    card: bool
    status: TenantStatus = TenantStatus.ACTIVE
    balance: int = 0
    held: int = 0
    created_at: datetime = START
    updated_at: datetime = START

    @property
    def available(self) -> int:
        return self.balance + (self.credit_limit if self.card else 0) - self.held

    def account(self, tenant_id: str) -> Account:
        return Account(
            tenant_id,
            self.status,
            self.credit_limit,
            self.card,
            self.balance,
            self.held,
            self.created_at,
            self.updated_at,
        )


@dataclass
class HoldModel:
    tenant_id: str
    price: ModelPrice
    amount: int
    expires_at: datetime
    status: HoldStatus = HoldStatus.OPEN
    charged: int = 0
    refunded: int = 0
    # The budget periods it took from, each with the budget's limit at the decision.
    periods: tuple[tuple[PeriodKey, int], ...] = ()
    # The budgets it took from as of the decision (each with the period it took from).
    budgets: tuple[BudgetUsage, ...] = ()

    @property
    def metered(self) -> bool:
        return self.price.billing is ModelBilling.METERED


def first_answer(answer: object) -> object:
    """A retried reservation shows its hold as it is now; its first answer showed it open."""
    if isinstance(answer, ReserveResult) and answer.hold is not None:
        hold = replace(answer.hold, status=HoldStatus.OPEN, settled_at=None, refunded_micros=0)
        return replace(answer, hold=hold)
    return answer


def reused(command: Any) -> Any:
    """The same request_id with other content."""
    if isinstance(command, Reserve):
        return replace(command, user_id=command.user_id + "x")
    if isinstance(command, ExtendHold):
        return replace(command, additional_output_tokens=command.additional_output_tokens + 1)
    if isinstance(command, Commit):
        usage = command.usage
        return replace(command, usage=replace(usage, input_tokens=usage.input_tokens + 1))
    if isinstance(command, Refund | Release | GrantCredit):
        return replace(command, reason=command.reason + "x")
    if isinstance(command, SetBudget):
        return replace(command, limit_micros=command.limit_micros + 1)
    if isinstance(command, DeleteBudget):
        return replace(command, scope_id=command.scope_id + "x")
    if isinstance(command, CreateTenant):
        return replace(command, credit_limit_micros=(command.credit_limit_micros or 0) + 1)
    return replace(command, payment_method_on_file=not command.payment_method_on_file)


class LedgerMachine(RuleBasedStateMachine):
    database_url: ClassVar[str]

    granted = Bundle("granted")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.engine: AsyncEngine = create_engine(self.database_url, pool_size=2)
        self.run(_reset(self.engine))
        self.clock = FakeClock(START)
        self.core = BillingCore(
            LedgerStore(self.engine),
            PRICES,
            CoreSettings(default_credit_limit_micros=DEFAULT_LIMIT),
            self.clock,
        )
        self.budget_core = BudgetCore(BudgetStore(self.engine), self.clock, PageTokens.random())
        self.tenants: dict[str, TenantModel] = {}
        self.budgets: dict[BudgetKey, tuple[int, BudgetPeriod]] = {}
        # Spent and held per budget period (the tables' budget_periods).
        self.periods: dict[PeriodKey, list[int]] = {}
        self.holds: dict[str, HoldModel] = {}
        # Every call that returned an answer (denials included), to replay it.
        self.done: list[tuple[Any, object]] = []
        self.numbers = 0
        self.last_entry_id = 0

    def teardown(self) -> None:
        try:
            self.run(self.engine.dispose())
        finally:
            self.loop.close()

    # Helpers

    def run(self, awaitable: Any) -> Any:
        return self.loop.run_until_complete(awaitable)

    def request_id(self, kind: str) -> str:
        self.numbers += 1
        return f"{kind}-{self.numbers}"

    def call(self, command: Any, *, remember: bool = True) -> object:
        """Runs a mutating command; returns its answer or the BillingError it raised."""
        core = self.core
        method: Any = {
            Reserve: core.reserve,
            Commit: core.commit,
            Refund: core.refund,
            Release: core.release,
            ExtendHold: core.extend_hold,
            GrantCredit: core.grant_credit,
            CreateTenant: core.create_tenant,
            UpdateTenant: core.update_tenant,
            SetBudget: self.budget_core.set_budget,
            DeleteBudget: self.budget_core.delete_budget,
        }[type(command)]
        try:
            answer: object = self.run(method(command))
        except BillingError as error:
            return error
        if remember:
            self.done.append((command, answer))
        return answer

    @staticmethod
    def expect_error(answer: object, reason: ErrorReason) -> None:
        event(f"error: {reason}")
        assert isinstance(answer, BillingError), f"expected {reason}, got {answer}"
        assert answer.reason is reason, f"expected {reason}, got {answer.reason}: {answer}"

    # Set-up

    @initialize()
    def create_tenants(self) -> None:
        with_card = CreateTenant("create-t0", "t0", 2_000_000, payment_method_on_file=True)
        assert self.call(with_card) == Account(
            "t0", TenantStatus.ACTIVE, 2_000_000, True, 0, 0, START, START
        )
        self.tenants["t0"] = TenantModel(2_000_000, card=True)
        assert isinstance(self.call(CreateTenant("create-t1", "t1")), Account)
        self.tenants["t1"] = TenantModel(DEFAULT_LIMIT, card=False)
        prepaid = self.call(GrantCredit("prepay-t1", "t1", 500_000, "prepaid"))
        assert isinstance(prepaid, GrantOutcome)
        self.last_entry_id = prepaid.entry_id
        self.tenants["t1"].balance = 500_000

    # Rules

    @rule(
        target=granted,
        tenant_id=tenant_ids,
        model=st.sampled_from(MODELS),
        size=amounts,
        ttl=ttls,
        caller=callers,
    )
    def reserve_amount(
        self, tenant_id: str, model: str, size: int, ttl: timedelta | None, caller: tuple[str, str]
    ) -> Any:
        return self.reserve(tenant_id, model, size, ttl, caller)

    @rule(
        target=granted,
        tenant_id=tenant_ids,
        model=st.sampled_from(MODELS),
        size=estimates,
        ttl=ttls,
        caller=callers,
    )
    def reserve_estimate(
        self,
        tenant_id: str,
        model: str,
        size: QueryEstimate,
        ttl: timedelta | None,
        caller: tuple[str, str],
    ) -> Any:
        return self.reserve(tenant_id, model, size, ttl, caller)

    @rule(
        target=granted,
        tenant_id=tenant_ids,
        model=st.sampled_from([TOKENS, TOKENS, FLAT, INCLUDED]),
        size=st.one_of(amounts, estimates),
        share=st.sampled_from([0, 50, 100, 120, 300, CAP, CAP]),
        cached=st.integers(0, 20),
        caller=callers,
    )
    def query(
        self,
        tenant_id: str,
        model: str,
        size: int | QueryEstimate,
        share: int,
        cached: int,
        caller: tuple[str, str],
    ) -> Any:
        """A model call: reserve, then commit what it really used (maybe more than held)."""
        hold_id = self.reserve(tenant_id, model, size, None, caller)
        if isinstance(hold_id, str):
            self.commit(hold_id, share, cached)
        return hold_id

    @rule(
        target=granted,
        tenant_id=tenant_ids,
        model=st.sampled_from([TOKENS, FLAT, INCLUDED]),
        size=amounts,
        ttl=ttls,
        wait_s=st.sampled_from([0, 0, 1, 31]),
        how=st.sampled_from(["Release", "Refund", "refund_all", "amount"]),
    )
    def give_back(
        self,
        tenant_id: str,
        model: str,
        size: int,
        ttl: timedelta | None,
        wait_s: int,
        how: str,
    ) -> Any:
        """A query that fails: reserve, maybe wait past the hold's expire time (no sweep), then
        give it back with each shape of request, the right ones and the wrong ones."""
        hold_id = self.reserve(tenant_id, model, size, ttl, ("user", ""))
        if not isinstance(hold_id, str):
            return hold_id
        self.clock.advance(seconds=wait_s)
        if how == "Release":
            self.release(hold_id, "model failed")
        else:
            self.refund(hold_id, 1_000 if how == "amount" else 0, how == "refund_all")
        return hold_id

    def reserve(
        self,
        tenant_id: str,
        model: str,
        size: int | QueryEstimate,
        ttl: timedelta | None,
        caller: tuple[str, str],
    ) -> Any:
        estimate = size if isinstance(size, QueryEstimate) else None
        amount = size if isinstance(size, int) else None
        user_id, api_key_id = caller
        command = Reserve(
            self.request_id("reserve"),
            tenant_id,
            user_id,
            model,
            estimate,
            amount,
            ttl,
            api_key_id=api_key_id,
        )
        advice = self.check_access(tenant_id, model, estimate, caller)
        answer = self.call(command)

        now = self.clock.now
        tenant = self.tenants.setdefault(
            tenant_id, TenantModel(DEFAULT_LIMIT, card=False, created_at=now, updated_at=now)
        )
        price = PRICES.get(model)
        assert price is not None
        if price.billing is ModelBilling.INCLUDED:
            required = 0
        elif estimate is not None:
            required = price.hold_micros(estimate.input_tokens, estimate.max_output_tokens)
        else:
            assert amount is not None
            required = amount
        available = tenant.available
        if tenant.status is TenantStatus.SUSPENDED:
            reason: DenialReason | None = DenialReason.ACCOUNT_SUSPENDED
        elif price.billing is ModelBilling.INCLUDED or required <= available:
            reason = None
        elif tenant.card:
            reason = DenialReason.CREDIT_LIMIT_REACHED
        else:
            reason = DenialReason.PAYMENT_METHOD_REQUIRED
        usages = self.usages(tenant_id, caller)
        exhausted = None
        if reason is None and price.billing is ModelBilling.METERED:
            exhausted = next((u for u in usages if u.remaining_micros < required), None)
            if exhausted is not None:
                reason = DENIAL_REASONS[exhausted.budget.scope]
                event(f"reserve: {reason}")

        assert isinstance(answer, ReserveResult), answer
        event(f"reserve: {reason or 'granted'}")
        if estimate is not None:
            # Served one at a time, the advice read just before is the decision.
            assert (advice.allowed, advice.reason) == (reason is None, reason)
        if reason is not None:
            expected = replace(
                denial(reason, model, available, price.billing, required), budgets=usages
            )
            if exhausted is not None:
                expected = budget_denial(expected, exhausted)
            assert answer == ReserveResult(expected, None)
            return multiple()
        # Granted: a metered hold always fits in the credit available before it.
        assert required == 0 or required <= available
        tenant.held += required
        taken: tuple[tuple[PeriodKey, int], ...] = ()
        if price.billing is ModelBilling.METERED:
            usages = tuple(usage.after_hold(required) for usage in usages)
            taken = tuple(
                (self.take(usage, held=required), usage.budget.limit_micros) for usage in usages
            )
        assert answer.decision == Decision(
            True, None, "", tenant.available, price.billing, required, usages
        )
        hold = answer.hold
        assert hold is not None
        expires_at = self.clock.now + (ttl or timedelta(minutes=5))
        assert (hold.tenant_id, hold.model, hold.amount_micros, hold.expires_at) == (
            tenant_id,
            model,
            required,
            expires_at,
        )
        self.holds[hold.hold_id] = HoldModel(
            tenant_id, price, required, expires_at, periods=taken, budgets=usages
        )
        return hold.hold_id

    def usages(self, tenant_id: str, caller: tuple[str, str]) -> tuple[BudgetUsage, ...]:
        """The budgets of a call as the model sees them now, user first."""
        found = []
        for scope, scope_id in zip((BudgetScope.USER, BudgetScope.API_KEY), caller, strict=True):
            setting = self.budgets.get((tenant_id, scope, scope_id))
            if not scope_id or setting is None:
                continue
            limit, period = setting
            start = period_start(period, self.clock.now)
            spent, held = self.periods.get((tenant_id, scope.value, scope_id, start), [0, 0])
            found.append(
                BudgetUsage(Budget(tenant_id, scope, scope_id, limit, period), start, spent, held)
            )
        return tuple(found)

    def take(self, usage: BudgetUsage, *, held: int) -> PeriodKey:
        budget = usage.budget
        key = (budget.tenant_id, budget.scope.value, budget.scope_id, usage.period_start)
        self.periods.setdefault(key, [0, 0])[1] += held
        return key

    def move(self, hold: HoldModel, *, spent: int = 0, held: int = 0) -> None:
        for key, _ in hold.periods:
            self.periods[key][0] += spent
            self.periods[key][1] += held

    @rule(
        tenant_id=tenant_ids,
        scope=budget_scopes,
        limit=st.sampled_from([1, 200_000, 1_000_000, 3_000_000]),
        period=st.sampled_from(list(BudgetPeriod)),
    )
    def set_budget(
        self, tenant_id: str, scope: tuple[BudgetScope, str], limit: int, period: BudgetPeriod
    ) -> None:
        command = SetBudget(self.request_id("budget"), tenant_id, *scope, limit, period)
        answer = self.call(command)
        if tenant_id not in self.tenants:
            return self.expect_error(answer, ErrorReason.TENANT_NOT_FOUND)
        self.budgets[(tenant_id, *scope)] = (limit, period)
        event("set budget")
        assert answer == self.usages(tenant_id, _caller_of(*scope))[0]

    @initialize(
        user_limit=st.sampled_from([200_000, 1_000_000, 1_500_000]),
        key_limit=st.sampled_from([250_000, 2_000_000]),
        period=st.sampled_from(list(BudgetPeriod)),
    )
    def set_first_budgets(self, user_limit: int, key_limit: int, period: BudgetPeriod) -> None:
        """Budgets from the start, so most sequences run into them."""
        self.set_budget("t0", (BudgetScope.USER, "u1"), user_limit, period)
        self.set_budget("t0", (BudgetScope.API_KEY, "k1"), key_limit, BudgetPeriod.DAY)

    @rule(tenant_id=tenant_ids, scope=budget_scopes)
    def delete_budget(self, tenant_id: str, scope: tuple[BudgetScope, str]) -> None:
        command = DeleteBudget(self.request_id("unbudget"), tenant_id, *scope)
        answer = self.call(command)
        if tenant_id not in self.tenants:
            return self.expect_error(answer, ErrorReason.TENANT_NOT_FOUND)
        if (tenant_id, *scope) not in self.budgets:
            return self.expect_error(answer, ErrorReason.BUDGET_NOT_FOUND)
        assert answer == self.usages(tenant_id, _caller_of(*scope))[0]
        del self.budgets[(tenant_id, *scope)]
        event("delete budget")

    @rule(
        hold_id=granted,
        tokens=st.sampled_from([1, 100, 1_000, 20_000, 100_000]),
        streamed=st.sampled_from([0, 10, 5_000, 70_000]),
        ttl=ttls,
    )
    def extend(self, hold_id: str, tokens: int, streamed: int, ttl: timedelta | None) -> None:
        self.extend_hold(hold_id, tokens, streamed, ttl)

    @rule(
        target=granted,
        tenant_id=tenant_ids,
        model=st.sampled_from([TOKENS, TOKENS, FLAT, INCLUDED]),
        chunks=st.lists(st.sampled_from([100, 1_000, 20_000, 60_000]), min_size=1, max_size=4),
        caller=callers,
        share=st.sampled_from([50, 100, 120, CAP]),
    )
    def stream(
        self,
        tenant_id: str,
        model: str,
        chunks: list[int],
        caller: tuple[str, str],
        share: int,
    ) -> Any:
        """A streamed answer: a small hold, extended chunk by chunk while tokens stream, until
        an extension is denied; then a commit of what it really used."""
        hold_id = self.reserve(tenant_id, model, QueryEstimate(1_000, 200), None, caller)
        if not isinstance(hold_id, str):
            return hold_id
        streamed = 200
        for chunk in chunks:
            if not self.extend_hold(hold_id, chunk, streamed, None):
                break
            streamed += chunk
        self.commit(hold_id, share, 0)
        return hold_id

    def extend_hold(self, hold_id: str, tokens: int, streamed: int, ttl: timedelta | None) -> bool:
        """A streaming call grows its hold by more output tokens (ExtendHold): decided as a
        reservation of their price is, against the budgets the hold took from. Returns whether
        it was granted."""
        hold = self.holds[hold_id]
        usage = TokenUsage(1_000, 0, streamed)
        command = ExtendHold(self.request_id("extend"), hold_id, tokens, usage, ttl)
        answer = self.call(command)
        settled = {
            HoldStatus.COMMITTED: ErrorReason.HOLD_ALREADY_COMMITTED,
            HoldStatus.RELEASED: ErrorReason.HOLD_RELEASED,
            HoldStatus.EXPIRED: ErrorReason.HOLD_EXPIRED,
        }.get(hold.status)
        if settled is None and hold.expires_at <= self.clock.now:
            self.expire(hold)
            event("extend: expired instead")
            settled = ErrorReason.HOLD_EXPIRED
        if settled is not None:
            self.expect_error(answer, settled)
            return False
        tenant = self.tenants[hold.tenant_id]
        price = hold.price
        required = price.output_micros(tokens)
        refusal = decide(tenant.account(hold.tenant_id), price.model, price, required)
        reason = refusal.reason
        usages: tuple[BudgetUsage, ...] = ()
        exhausted = None
        if hold.metered:
            usages = self.hold_usages(hold)
            if reason is None:
                exhausted = next((u for u in usages if u.remaining_micros < required), None)
                if exhausted is not None:
                    reason = DENIAL_REASONS[exhausted.budget.scope]
        assert isinstance(answer, ExtendResult), answer
        event(f"extend: {reason or 'granted'}")
        if reason is None:
            tenant.held += required
            hold.amount += required
            if hold.metered:
                self.move(hold, held=required)
                usages = tuple(usage.after_hold(required) for usage in usages)
            hold.expires_at = max(hold.expires_at, self.clock.now + (ttl or timedelta(minutes=5)))
            expected = Decision(True, None, "", tenant.available, price.billing, required, usages)
        else:
            expected = replace(
                denial(reason, price.model, tenant.available, price.billing, required),
                budgets=usages,
            )
            if exhausted is not None:
                expected = budget_denial(expected, exhausted)
        assert answer.decision == expected
        assert (answer.hold.amount_micros, answer.hold.expires_at) == (
            hold.amount,
            hold.expires_at,
        )
        assert answer.extended_micros == (required if reason is None else 0)
        assert answer.covered_output_tokens == price.covered_output_tokens(hold.amount, usage)
        return reason is None

    def hold_usages(self, hold: HoldModel) -> tuple[BudgetUsage, ...]:
        """The budgets a hold took from as its extension sees them: each one's limit now (one
        deleted since does not apply) and the use of the period the hold took from."""
        found = []
        for usage in in_scope_order(hold.budgets):
            budget = usage.budget
            setting = self.budgets.get((budget.tenant_id, budget.scope, budget.scope_id))
            if setting is None:
                continue
            key = (budget.tenant_id, budget.scope.value, budget.scope_id, usage.period_start)
            spent, held = self.periods[key]
            found.append(
                BudgetUsage(
                    replace(budget, limit_micros=setting[0]), usage.period_start, spent, held
                )
            )
        return tuple(found)

    @rule(hold_id=granted, share=st.sampled_from([0, 50, 100]), cached=st.integers(0, 20))
    def commit_within(self, hold_id: str, share: int, cached: int) -> None:
        self.commit(hold_id, share, cached)

    @rule(hold_id=granted, share=st.sampled_from([120, 300, 1_000, CAP]), cached=st.integers(0, 20))
    def commit_above(self, hold_id: str, share: int, cached: int) -> None:
        self.commit(hold_id, share, cached)

    def commit(self, hold_id: str, share: int, cached: int) -> None:
        """Commits a hold at `share` percent of its amount (CAP: past the credit limit)."""
        hold = self.holds[hold_id]
        # A cost of `share` percent of the hold; CAP: more than all the credit left.
        # TOKENS: 15 micros per output token and 0.3 per cached one; the others ignore the split.
        target = hold.amount * share // 100
        if share == CAP:
            target = hold.amount + max(0, self.tenants[hold.tenant_id].available) + 15_000
        usage = TokenUsage(0, cached, target // 15)
        answer = self.call(Commit(self.request_id("commit"), hold_id, usage))
        if hold.status is HoldStatus.COMMITTED:
            return self.expect_error(answer, ErrorReason.HOLD_ALREADY_COMMITTED)
        if hold.status is HoldStatus.RELEASED:
            return self.expect_error(answer, ErrorReason.HOLD_RELEASED)
        if hold.status is HoldStatus.EXPIRED or hold.expires_at <= self.clock.now:
            return self.expect_error(answer, ErrorReason.HOLD_EXPIRED)

        tenant = self.tenants[hold.tenant_id]
        cost = hold.price.cost_micros(usage)
        charged = uncollected = 0
        if hold.metered:
            room = min(
                (
                    tenant.available,
                    *(limit - sum(self.periods[key]) for key, limit in hold.periods),
                )
            )
            settlement = settle(_domain_hold(hold_id, hold), cost, room)
            charged, uncollected = settlement.charged_micros, settlement.uncollected_micros
            self.move(hold, spent=charged, held=-hold.amount)
            was_within_cap = tenant.available >= 0
            tenant.balance -= charged
            tenant.held -= hold.amount
            # A commit never takes a tenant from within its cap to beyond it.
            assert tenant.available >= 0 or not was_within_cap
        hold.status, hold.charged = HoldStatus.COMMITTED, charged
        if uncollected:
            event("commit: above the hold, capped")
        elif cost > hold.amount and hold.metered:
            event("commit: above the hold, charged")
        else:
            event("commit: within the hold")
        assert isinstance(answer, CommitOutcome), answer
        record = answer.record
        assert (
            record.cost_micros,
            record.charged_micros,
            record.uncollected_micros,
            record.held_micros,
            record.payment_source,
            record.usage,
        ) == (
            cost,
            charged,
            uncollected,
            hold.amount,
            PaymentSource.CREDIT if hold.metered else PaymentSource.INCLUDED,
            usage,
        )
        assert answer.available_after_micros == tenant.available

    @rule(hold_id=granted, reason=st.sampled_from(["", "cancelled"]))
    def release(self, hold_id: str, reason: str) -> None:
        command = Release(self.request_id("release"), hold_id, reason)
        self.release_by(command, self.call(command))

    @rule(
        hold_id=granted,
        amount=st.sampled_from([0, 0, 1, 1_000, 10**6]),
        refund_all=st.booleans(),
    )
    def refund(self, hold_id: str, amount: int, refund_all: bool) -> None:
        hold = self.holds[hold_id]
        command = Refund(self.request_id("refund"), hold_id, amount, "support", refund_all)
        answer = self.call(command)
        if command.asks_release:
            # What earlier clients sent to release: exactly a release, never a refund.
            return self.release_by(command, answer)
        if amount and refund_all:
            return self.expect_error(answer, ErrorReason.FIELD_INVALID)
        tenant = self.tenants[hold.tenant_id]
        if hold.status is HoldStatus.COMMITTED:
            refundable = hold.charged - hold.refunded
            given = refundable if refund_all else amount
            if refundable <= 0 or given > refundable:
                return self.expect_error(answer, ErrorReason.REFUND_EXCEEDS_CHARGE)
            hold.refunded += given
            tenant.balance += given
            self.move(hold, spent=-given)
            expected = RefundOutcome(
                EntryKind.REFUND, given, tenant.available, hold.refunded, fingerprint(command)
            )
        elif hold.status is HoldStatus.RELEASED:
            return self.expect_error(answer, ErrorReason.HOLD_RELEASED)
        elif hold.status is HoldStatus.EXPIRED or hold.expires_at <= self.clock.now:
            # Due and not swept yet: a refund leaves it to the sweep.
            return self.expect_error(answer, ErrorReason.HOLD_EXPIRED)
        elif refund_all:
            return self.expect_error(answer, ErrorReason.HOLD_NOT_COMMITTED)
        else:
            return self.expect_error(answer, ErrorReason.PARTIAL_RELEASE_NOT_ALLOWED)
        assert answer == expected
        event(f"refund: {expected.kind}")

    def release_by(self, command: Release | Refund, answer: object) -> None:
        """A release (Release, or a Refund without an amount): gives back an open hold before
        its expire time, expires one past it, and never touches a settled one."""
        hold = self.holds[command.reservation_id]
        tenant = self.tenants[hold.tenant_id]
        if hold.status is HoldStatus.COMMITTED:
            return self.expect_error(answer, ErrorReason.HOLD_ALREADY_COMMITTED)
        if hold.status is HoldStatus.RELEASED:
            return self.expect_error(answer, ErrorReason.HOLD_RELEASED)
        if hold.status is HoldStatus.EXPIRED:
            return self.expect_error(answer, ErrorReason.HOLD_EXPIRED)
        if hold.expires_at <= self.clock.now:
            self.expire(hold)
            event("release: expired instead")
            return self.expect_error(answer, ErrorReason.HOLD_EXPIRED)
        hold.status = HoldStatus.RELEASED
        tenant.held -= hold.amount
        if hold.metered:
            self.move(hold, held=-hold.amount)
        expected: object = ReleaseOutcome(hold.amount, tenant.available, fingerprint(command))
        if isinstance(command, Refund):
            expected = RefundOutcome(
                EntryKind.RELEASE, hold.amount, tenant.available, 0, fingerprint(command)
            )
        event(f"release: by {type(command).__name__}")
        assert answer == expected

    def expire(self, hold: HoldModel) -> None:
        hold.status = HoldStatus.EXPIRED
        self.tenants[hold.tenant_id].held -= hold.amount
        if hold.metered:
            self.move(hold, held=-hold.amount)

    @rule(tenant_id=tenant_ids, amount=st.sampled_from([1, 1_000, 250_000, 2_000_000]))
    def grant(self, tenant_id: str, amount: int) -> None:
        command = GrantCredit(self.request_id("grant"), tenant_id, amount, "goodwill")
        answer = self.call(command)
        tenant = self.tenants.get(tenant_id)
        if tenant is None:
            return self.expect_error(answer, ErrorReason.TENANT_NOT_FOUND)
        tenant.balance += amount
        assert isinstance(answer, GrantOutcome), answer
        limit = tenant.credit_limit if tenant.card else 0
        assert answer.balance == Balance(tenant.balance, tenant.held, limit)
        assert answer.request_fingerprint == fingerprint(command)
        assert answer.entry_id > self.last_entry_id
        self.last_entry_id = answer.entry_id

    @rule(
        tenant_id=tenant_ids,
        credit_limit=st.none() | limits,
        status=st.sampled_from([None, None, TenantStatus.ACTIVE, TenantStatus.SUSPENDED]),
        card=st.sampled_from([None, True, False]),
    )
    def update_tenant(
        self,
        tenant_id: str,
        credit_limit: int | None,
        status: TenantStatus | None,
        card: bool | None,
    ) -> None:
        command = UpdateTenant(self.request_id("update"), tenant_id, credit_limit, status, card)
        answer = self.call(command)
        tenant = self.tenants.get(tenant_id)
        if tenant is None:
            return self.expect_error(answer, ErrorReason.TENANT_NOT_FOUND)
        if credit_limit is not None:
            tenant.credit_limit = credit_limit
        if status is not None:
            tenant.status = status
        if card is not None:
            tenant.card = card
        tenant.updated_at = self.clock.now
        assert answer == tenant.account(tenant_id)

    @precondition(lambda self: len(self.tenants) < len(TENANTS))
    @rule(tenant_id=tenant_ids, credit_limit=st.none() | limits, card=st.booleans())
    def create_tenant(self, tenant_id: str, credit_limit: int | None, card: bool) -> None:
        command = CreateTenant(
            self.request_id("create"), tenant_id, credit_limit, payment_method_on_file=card
        )
        answer = self.call(command)
        if tenant_id in self.tenants:
            return self.expect_error(answer, ErrorReason.TENANT_ALREADY_EXISTS)
        tenant = TenantModel(
            DEFAULT_LIMIT if credit_limit is None else credit_limit,
            card,
            created_at=self.clock.now,
            updated_at=self.clock.now,
        )
        self.tenants[tenant_id] = tenant
        assert answer == tenant.account(tenant_id)

    @rule(
        seconds=st.sampled_from([1, 29, 31, 299, 301, 601, 6 * 3600, 3 * 86_400, 31 * 86_400]),
        sweep=st.booleans(),
    )
    def advance_clock(self, seconds: int, sweep: bool) -> None:
        """Time passes; the sweeper may or may not run (a due hold can wait for it)."""
        self.clock.advance(seconds=seconds)
        if not sweep:
            return
        released = self.run(self.core.release_expired())
        due = [
            hold
            for hold in self.holds.values()
            if hold.status is HoldStatus.OPEN and hold.expires_at <= self.clock.now
        ]
        assert released == len(due)
        for hold in due:
            self.expire(hold)

    def check_access(
        self,
        tenant_id: str,
        model: str,
        estimate: QueryEstimate | None,
        caller: tuple[str, str],
    ) -> Decision:
        """CheckAccess, which must answer what the model decides (and change nothing)."""
        command = CheckAccess(tenant_id, model, estimate, *caller)
        decision = self.run(self.core.check_access(command))
        assert isinstance(decision, Decision)
        tenant = self.tenants.get(tenant_id, TenantModel(DEFAULT_LIMIT, card=False))
        price = PRICES.get(model)
        required = 0
        if price is not None:
            size = estimate or QueryEstimate(0, 0)
            required = price.hold_micros(size.input_tokens, size.max_output_tokens)
        advice = decide(tenant.account(tenant_id), model, price, required)
        assert decision == within_budgets(advice, self.usages(tenant_id, caller))
        return decision

    @precondition(lambda self: bool(self.done))
    @rule(pick=st.integers(0, 10**6))
    def retry(self, pick: int) -> None:
        """A call sent again as is: the first answer, and nothing changes."""
        command, first = self.done[pick % len(self.done)]
        before = self.run(snapshot(self.engine))
        answer = self.call(command, remember=False)
        assert first_answer(answer) == first
        assert self.run(snapshot(self.engine)) == before

    @precondition(lambda self: bool(self.done))
    @rule(pick=st.integers(0, 10**6))
    def reuse_request_id(self, pick: int) -> None:
        """A request_id sent again with other content: refused, and nothing changes."""
        command, _ = self.done[pick % len(self.done)]
        before = self.run(snapshot(self.engine))
        answer = self.call(reused(command), remember=False)
        self.expect_error(answer, ErrorReason.REQUEST_ID_REUSED)
        assert self.run(snapshot(self.engine)) == before

    # Invariants, checked after every step

    @invariant()
    def books_balance_and_match_the_model(self) -> None:
        if any(tenant.available < 0 for tenant in self.tenants.values()):
            event("a tenant over a lowered limit")
        expected = [
            f"tenant {tenant_id}: exposure over the credit limit by {-tenant.available} micros"
            for tenant_id, tenant in sorted(self.tenants.items())
            if tenant.available < 0
        ]
        assert self.run(audit_ledger(self.engine)) == expected
        tables: Tables = self.run(read_tables(self.engine))
        assert table_problems(tables, cap=False) == []
        assert self.run(rollup_problems(self.engine)) == []
        stored_tenants = {
            row.tenant_id: (
                row.balance_micros,
                row.held_micros,
                TenantStatus(row.status),
                row.credit_limit_micros,
                bool(row.payment_method_on_file),
            )
            for row in tables.tenants
        }
        assert stored_tenants == {
            tenant_id: (
                tenant.balance,
                tenant.held,
                tenant.status,
                tenant.credit_limit,
                tenant.card,
            )
            for tenant_id, tenant in self.tenants.items()
        }
        stored_holds = {
            row.hold_id: (HoldStatus(row.status), row.refunded_micros, row.amount_micros)
            for row in tables.holds
            if row.status != HoldStatus.DENIED
        }
        assert stored_holds == {
            hold_id: (hold.status, hold.refunded, hold.amount)
            for hold_id, hold in self.holds.items()
        }
        stored_periods = {
            (row.tenant_id, row.scope, row.scope_id, row.period_start): [
                row.spent_micros,
                row.held_micros,
            ]
            for row in tables.budget_periods
            if row.spent_micros or row.held_micros
        }
        assert stored_periods == {key: use for key, use in self.periods.items() if any(use)}


def _caller_of(scope: BudgetScope, scope_id: str) -> tuple[str, str]:
    return (scope_id, "") if scope is BudgetScope.USER else ("", scope_id)


def _domain_hold(hold_id: str, hold: HoldModel) -> Hold:
    return Hold(
        hold_id=hold_id,
        request_id="",
        request_fingerprint="",
        tenant_id=hold.tenant_id,
        user_id="user",
        model=hold.price.model,
        price=hold.price,
        amount_micros=hold.amount,
        status=hold.status,
        created_at=START,
        expires_at=hold.expires_at,
        decision_available_micros=0,
    )


async def _reset(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        tables = (
            usage_rollups,
            usage_records,
            ledger_entries,
            hold_extensions,
            holds,
            admin_requests,
            budget_requests,
            budget_periods,
            budgets,
            tenants,
        )
        for table in tables:
            await conn.execute(delete(table))


def test_random_sequences_keep_the_books_exact(database_url: str) -> None:
    machine = type("Machine", (LedgerMachine,), {"database_url": database_url})
    OUTCOMES.clear()
    run_state_machine_as_test(machine, settings=SETTINGS)
    print(sorted(OUTCOMES.items()))
