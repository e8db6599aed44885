"""The billing core: the use cases behind every RPC, in plain Python.

It validates a request, prices it, asks the ledger store to apply it atomically, and turns the
stored result into an answer. Transports (gRPC) call it; it imports no transport and no driver.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Protocol

from billing_service.domain.budgets import BudgetScope, BudgetUsage
from billing_service.domain.commands import (
    CheckAccess,
    Commit,
    CreateTenant,
    ExtendHold,
    GrantCredit,
    Refund,
    Release,
    Reserve,
    TtlBounds,
    UpdateTenant,
    check_id,
    fingerprint,
    validate_check_access,
    validate_commit,
    validate_create_tenant,
    validate_extend_hold,
    validate_grant,
    validate_refund,
    validate_release,
    validate_reserve,
    validate_update_tenant,
)
from billing_service.domain.errors import ErrorReason, NotFound, request_id_reused
from billing_service.domain.model import Account, DenialReason, Hold, HoldStatus, TenantStatus
from billing_service.domain.outcomes import (
    CommitOutcome,
    ExtendOutcome,
    GrantOutcome,
    RefundOutcome,
    ReleaseOutcome,
    TenantOutcome,
)
from billing_service.domain.payments import TopUpAttempt
from billing_service.domain.policy import (
    Decision,
    budget_denial,
    decide,
    denial,
    within_budgets,
)
from billing_service.domain.pricing import ModelBilling, ModelPrice, PriceTable

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def new_reservation_id() -> str:
    return f"rsv_{uuid.uuid4().hex}"


class LedgerPort(Protocol):
    """What the core needs from storage; each call is one transaction."""

    async def get_account(self, tenant_id: str) -> Account | None: ...

    async def budget_usages(
        self, tenant_id: str, user_id: str, api_key_id: str, now: datetime
    ) -> tuple[BudgetUsage, ...]: ...

    async def place_hold(
        self,
        hold: Hold,
        *,
        create_with_limit: int | None,
        defer_credit_denial: bool = False,
        credit_denial_reason: DenialReason | None = None,
    ) -> Hold: ...

    async def find_hold(self, request_id: str) -> Hold | None: ...

    async def commit(
        self, command: Commit, request_fingerprint: str, now: datetime
    ) -> CommitOutcome: ...

    async def release(
        self, command: Release, request_fingerprint: str, now: datetime
    ) -> ReleaseOutcome: ...

    async def extend_hold(
        self, command: ExtendHold, request_fingerprint: str, ttl: timedelta, now: datetime
    ) -> ExtendOutcome: ...

    async def refund(
        self, command: Refund, request_fingerprint: str, now: datetime
    ) -> RefundOutcome: ...

    async def release_expired(self, now: datetime, limit: int = 100) -> int: ...

    async def grant(
        self, command: GrantCredit, request_fingerprint: str, now: datetime
    ) -> GrantOutcome: ...

    async def create_tenant(
        self,
        command: CreateTenant,
        request_fingerprint: str,
        credit_limit_micros: int,
        now: datetime,
    ) -> TenantOutcome: ...

    async def update_tenant(
        self, command: UpdateTenant, request_fingerprint: str, now: datetime
    ) -> TenantOutcome: ...


class TopUpPort(Protocol):
    """Card top-ups, as the reservation path sees them (implemented in payments/)."""

    def credit_seen(self, tenant_id: str, available_micros: int) -> None:
        """Told the credit left after a grant; must not block (it may wake a worker)."""

    async def top_up(
        self, tenant_id: str, hold_micros: int, shortfall_micros: int, wait_s: float
    ) -> TopUpAttempt:
        """Starts or joins a top-up for a hold of `hold_micros` that found `shortfall_micros`
        too little credit, unless the tenant has room for it by now; waits up to `wait_s` and
        says how it ended. The caller tries the hold again whatever the answer."""
        ...


@dataclass(frozen=True, slots=True)
class CoreSettings:
    # The credit limit of a new tenant, extended once it has a payment method ($25).
    default_credit_limit_micros: int = 25_000_000
    # Whether a first call for an unknown tenant creates it (else: NOT_FOUND).
    auto_create_tenants: bool = True
    ttl_bounds: TtlBounds = field(default_factory=TtlBounds)


@dataclass(frozen=True, slots=True)
class ReserveResult:
    decision: Decision
    # The hold, when the decision allows.
    hold: Hold | None


@dataclass(frozen=True, slots=True)
class ExtendResult:
    decision: Decision
    # The hold after the call: grown when the decision allows, as it was when it denies.
    hold: Hold
    # What was added to the hold, in micros (0 when denied).
    extended_micros: int
    # How many more output tokens past the request's usage the hold pays for now.
    covered_output_tokens: int


class BillingCore:
    def __init__(
        self,
        ledger: LedgerPort,
        prices: PriceTable,
        settings: CoreSettings | None = None,
        clock: Clock = utc_now,
        top_up: TopUpPort | None = None,
    ) -> None:
        self._ledger = ledger
        self._prices = prices
        self._settings = settings or CoreSettings()
        self._clock = clock
        self.top_up = top_up

    @property
    def prices(self) -> PriceTable:
        return self._prices

    async def check_access(self, command: CheckAccess) -> Decision:
        validate_check_access(command)
        account = await self._account_or_default(command.tenant_id)
        price = self._prices.get(command.model)
        required = 0
        if price is not None:
            estimate = command.estimate
            required = (
                price.hold_micros(estimate.input_tokens, estimate.max_output_tokens)
                if estimate is not None
                else price.hold_micros(0, 0)
            )
        decision = decide(account, command.model, price, required)
        if not (command.user_id or command.api_key_id):
            return decision
        usages = await self._ledger.budget_usages(
            command.tenant_id, command.user_id, command.api_key_id, self._clock()
        )
        return within_budgets(decision, usages)

    async def reserve(self, command: Reserve, wait_s: float = 0.0) -> ReserveResult:
        """wait_s: how long a reservation without room may wait for a card top-up."""
        ttl = validate_reserve(command, self._settings.ttl_bounds)
        price = self._prices.get(command.model)
        request_fingerprint = fingerprint(command)
        if price is None:
            return await self._model_not_offered(command, request_fingerprint)
        now = self._clock()
        hold = Hold(
            hold_id=new_reservation_id(),
            request_id=command.request_id,
            request_fingerprint=request_fingerprint,
            tenant_id=command.tenant_id,
            user_id=command.user_id,
            api_key_id=command.api_key_id,
            model=command.model,
            price=price,
            amount_micros=_hold_amount(command, price),
            status=HoldStatus.OPEN,
            created_at=now,
            expires_at=now + ttl,
            decision_available_micros=0,
        )
        top_up = self.top_up
        may_wait = top_up is not None and wait_s > 0 and hold.metered
        stored = await self._ledger.place_hold(
            hold, create_with_limit=self._creation_limit(), defer_credit_denial=may_wait
        )
        if stored.request_fingerprint != request_fingerprint:
            raise request_id_reused(command.request_id)
        if top_up is not None and stored.hold_id == hold.hold_id:
            if stored.status is HoldStatus.DENIED and may_wait:
                # Not stored yet: the answer given after the top-up is the one kept.
                shortfall = hold.amount_micros - stored.decision_available_micros
                attempt = await top_up.top_up(hold.tenant_id, hold.amount_micros, shortfall, wait_s)
                stored = await self._ledger.place_hold(
                    hold,
                    create_with_limit=self._creation_limit(),
                    credit_denial_reason=_CREDIT_DENIAL_AFTER.get(attempt),
                )
                if stored.request_fingerprint != request_fingerprint:
                    raise request_id_reused(command.request_id)
            elif stored.status is HoldStatus.OPEN and hold.metered:
                top_up.credit_seen(hold.tenant_id, stored.decision_available_micros)
        return _reserve_result(stored)

    async def _model_not_offered(self, command: Reserve, request_fingerprint: str) -> ReserveResult:
        """A model missing from the price table is refused without writing anything, unless
        this is a retry of a request made while the model was offered: that replays."""
        prior = await self._ledger.find_hold(command.request_id)
        if prior is not None:
            if prior.request_fingerprint != request_fingerprint:
                raise request_id_reused(command.request_id)
            return _reserve_result(prior)
        account = await self._account_or_default(command.tenant_id)
        return ReserveResult(decide(account, command.model, None, 0), None)

    async def commit(self, command: Commit) -> CommitOutcome:
        validate_commit(command)
        request_fingerprint = fingerprint(command)
        outcome = await self._ledger.commit(command, request_fingerprint, self._clock())
        if outcome.record.request_fingerprint != request_fingerprint:
            raise request_id_reused(command.request_id)
        return outcome

    async def release(self, command: Release) -> ReleaseOutcome:
        validate_release(command)
        request_fingerprint = fingerprint(command)
        outcome = await self._ledger.release(command, request_fingerprint, self._clock())
        if outcome.request_fingerprint != request_fingerprint:
            raise request_id_reused(command.request_id)
        return outcome

    async def extend_hold(self, command: ExtendHold) -> ExtendResult:
        ttl = validate_extend_hold(command, self._settings.ttl_bounds)
        request_fingerprint = fingerprint(command)
        outcome = await self._ledger.extend_hold(command, request_fingerprint, ttl, self._clock())
        if outcome.request_fingerprint != request_fingerprint:
            raise request_id_reused(command.request_id)
        return _extend_result(outcome, command)

    async def refund(self, command: Refund) -> RefundOutcome:
        validate_refund(command)
        request_fingerprint = fingerprint(command)
        outcome = await self._ledger.refund(command, request_fingerprint, self._clock())
        if outcome.request_fingerprint != request_fingerprint:
            raise request_id_reused(command.request_id)
        return outcome

    async def release_expired(self, limit: int = 100) -> int:
        return await self._ledger.release_expired(self._clock(), limit)

    async def create_tenant(self, command: CreateTenant) -> Account:
        validate_create_tenant(command)
        request_fingerprint = fingerprint(command)
        limit = command.credit_limit_micros
        if limit is None:
            limit = self._settings.default_credit_limit_micros
        outcome = await self._ledger.create_tenant(
            command, request_fingerprint, limit, self._clock()
        )
        return _checked(outcome, request_fingerprint, command.request_id).account

    async def update_tenant(self, command: UpdateTenant) -> Account:
        validate_update_tenant(command)
        request_fingerprint = fingerprint(command)
        outcome = await self._ledger.update_tenant(command, request_fingerprint, self._clock())
        return _checked(outcome, request_fingerprint, command.request_id).account

    async def get_tenant(self, tenant_id: str) -> Account:
        check_id("tenant_id", tenant_id)
        account = await self._ledger.get_account(tenant_id)
        if account is None:
            raise NotFound(ErrorReason.TENANT_NOT_FOUND, f"tenant {tenant_id} does not exist")
        return account

    async def grant_credit(self, command: GrantCredit) -> GrantOutcome:
        validate_grant(command)
        request_fingerprint = fingerprint(command)
        outcome = await self._ledger.grant(command, request_fingerprint, self._clock())
        if outcome.request_fingerprint != request_fingerprint:
            raise request_id_reused(command.request_id)
        return outcome

    async def _account_or_default(self, tenant_id: str) -> Account:
        """The tenant's account; an unknown tenant reads as a new one when tenants auto-create."""
        account = await self._ledger.get_account(tenant_id)
        if account is not None:
            return account
        limit = self._creation_limit()
        if limit is None:
            raise NotFound(ErrorReason.TENANT_NOT_FOUND, f"tenant {tenant_id} does not exist")
        return Account(tenant_id, TenantStatus.ACTIVE, limit, payment_method_on_file=False)

    def _creation_limit(self) -> int | None:
        if not self._settings.auto_create_tenants:
            return None
        return self._settings.default_credit_limit_micros


def _hold_amount(command: Reserve, price: ModelPrice) -> int:
    if price.billing is ModelBilling.INCLUDED:
        return 0
    if command.estimate is not None:
        return price.hold_micros(command.estimate.input_tokens, command.estimate.max_output_tokens)
    assert command.amount_micros is not None
    return command.amount_micros


# Why a reservation still without room is denied, after the top-up it asked for.
_CREDIT_DENIAL_AFTER = {TopUpAttempt.LIMIT_REACHED: DenialReason.TOP_UP_LIMIT_REACHED}


def _reserve_result(hold: Hold) -> ReserveResult:
    """The answer a reservation was first given, rebuilt from what was stored."""
    billing = None if hold.price is None else hold.price.billing
    if hold.status is HoldStatus.DENIED:
        reason = hold.denial_reason or DenialReason.CREDIT_LIMIT_REACHED
        decision = denial(
            reason, hold.model, hold.decision_available_micros, billing, hold.amount_micros
        )
        decision = replace(decision, budgets=hold.budgets)
        exhausted = _exhausted_budget(hold.denial_reason, hold.budgets)
        if exhausted is not None:
            decision = budget_denial(decision, exhausted)
        return ReserveResult(decision, None)
    # A retry replays the grant as it was given, whatever happened to the hold since (its
    # extensions included).
    as_granted = hold.as_granted()
    decision = Decision(
        allowed=True,
        reason=None,
        message="",
        available_micros=hold.decision_available_micros,
        billing=billing,
        required_micros=as_granted.amount_micros,
        budgets=hold.budgets,
    )
    return ReserveResult(decision, as_granted)


def _extend_result(outcome: ExtendOutcome, command: ExtendHold) -> ExtendResult:
    """The answer an extension was first given, rebuilt from what was stored."""
    hold = outcome.hold
    assert hold.price is not None
    billing = hold.price.billing
    if outcome.denial_reason is None:
        decision = Decision(
            allowed=True,
            reason=None,
            message="",
            available_micros=outcome.available_micros,
            billing=billing,
            required_micros=outcome.required_micros,
            budgets=outcome.budgets,
        )
    else:
        decision = denial(
            outcome.denial_reason,
            hold.model,
            outcome.available_micros,
            billing,
            outcome.required_micros,
        )
        decision = replace(decision, budgets=outcome.budgets)
        exhausted = _exhausted_budget(outcome.denial_reason, outcome.budgets)
        if exhausted is not None:
            decision = budget_denial(decision, exhausted)
    return ExtendResult(
        decision,
        hold,
        outcome.required_micros if outcome.granted else 0,
        hold.price.covered_output_tokens(hold.amount_micros, command.usage),
    )


def _exhausted_budget(
    reason: DenialReason | None, usages: tuple[BudgetUsage, ...]
) -> BudgetUsage | None:
    scope = {
        DenialReason.USER_BUDGET_EXHAUSTED: BudgetScope.USER,
        DenialReason.API_KEY_BUDGET_EXHAUSTED: BudgetScope.API_KEY,
    }.get(reason or DenialReason.CREDIT_LIMIT_REACHED)
    return next((usage for usage in usages if usage.budget.scope is scope), None)


def _checked(outcome: TenantOutcome, request_fingerprint: str, request_id: str) -> TenantOutcome:
    if outcome.request_fingerprint != request_fingerprint:
        raise request_id_reused(request_id)
    return outcome
