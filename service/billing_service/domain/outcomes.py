"""What the ledger's operations return: the stored result, new or replayed.

Each carries the fingerprint of the request that first wrote it, so the core can tell a retry
(same fingerprint) from a request_id reused for something else.
"""

from __future__ import annotations

from dataclasses import dataclass

from billing_service.domain.budgets import BudgetUsage
from billing_service.domain.ledger import EntryKind
from billing_service.domain.model import Account, Balance, DenialReason, Hold, UsageRecord


@dataclass(frozen=True, slots=True)
class CommitOutcome:
    record: UsageRecord
    available_after_micros: int


@dataclass(frozen=True, slots=True)
class RefundOutcome:
    kind: EntryKind
    amount_micros: int
    available_after_micros: int
    refunded_total_micros: int
    request_fingerprint: str


@dataclass(frozen=True, slots=True)
class ReleaseOutcome:
    released_micros: int
    available_after_micros: int
    request_fingerprint: str


@dataclass(frozen=True, slots=True)
class GrantOutcome:
    entry_id: int
    balance: Balance
    request_fingerprint: str


@dataclass(frozen=True, slots=True)
class TenantOutcome:
    account: Account
    request_fingerprint: str


@dataclass(frozen=True, slots=True)
class ExtendOutcome:
    """What an ExtendHold decided, as stored (a retry replays it)."""

    # The hold right after the decision: grown and with its new expire time when granted,
    # unchanged when denied.
    hold: Hold
    # The extension's price in micros (what was added when granted).
    required_micros: int
    # None when granted.
    denial_reason: DenialReason | None
    # The tenant's available credit as of the decision (after the extension if granted).
    available_micros: int
    # The budgets the hold took from, as of the decision (after the extension if granted).
    budgets: tuple[BudgetUsage, ...]
    request_fingerprint: str

    @property
    def granted(self) -> bool:
        return self.denial_reason is None
