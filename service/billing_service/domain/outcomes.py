"""What the ledger's operations return: the stored result, new or replayed.

Each carries the fingerprint of the request that first wrote it, so the core can tell a retry
(same fingerprint) from a request_id reused for something else.
"""

from __future__ import annotations

from dataclasses import dataclass

from billing_service.domain.ledger import EntryKind
from billing_service.domain.model import Account, Balance, UsageRecord


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
